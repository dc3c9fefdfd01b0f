#!/bin/sh
# fleetbake node installer for @TARGET@ (@DEBARCH@): installs the Debian package
# @DEB_NAME@ (embedded below, checked against its sha256 before use), writes
# @NODE_ENV@ and starts executor.service. Run `sh install.sh --help` for usage.
#
# Exit status: 0 done (or nothing to change); 1 an install step failed; 2 bad usage or
# a missing or invalid identity; 3 this system cannot take the node (not root, not
# Debian-family, no systemd, another architecture, Python too old).
#
# Everything runs from `main` on the last line, so a truncated download runs nothing.
set -eu

PACKAGE=@PACKAGE@
VERSION=@VERSION@
TARGET=@TARGET@
DEBARCH=@DEBARCH@
DEB_NAME=@DEB_NAME@
DEB_SHA256=@DEB_SHA256@
NODE_ENV=@NODE_ENV@
STATE_DIR=@STATE_DIR@
UNIT=@UNIT@
PYTHON=@PYTHON@
PYTHON_MIN=@PYTHON_MIN@
PYTHON_BELOW=@PYTHON_BELOW@  # set when the package carries wheels built for one Python
# Agent variables taken over from the environment into node.env when set.
AGENT_VARS="@AGENT_VARS@"
# Set by their own options (or these variables); --env may not set them.
RESERVED="EXECUTOR_NODE_ID EXECUTOR_RUN_ID EXECUTOR_MASTER_URL EXECUTOR_TOKEN EXECUTOR_TOKEN_FILE EXECUTOR_ON_COMPLETE"
NL='
'
CR=$(printf '\r')

say() { printf 'install.sh: %s\n' "$*" >&2; }
fail() { code=$1; shift; printf 'install.sh: error: %s\n' "$*" >&2; exit "$code"; }
usage_error() { fail 2 "$* (see --help)"; }

usage() {
  cat <<EOF
Usage: sh install.sh [OPTIONS]
       sh install.sh --uninstall [--purge]

Install $PACKAGE $VERSION ($TARGET) on this Debian or Ubuntu system,
write $NODE_ENV (mode 0600), and enable and start $UNIT.
Running it again with the same inputs changes nothing; a newer installer upgrades.

Identity (options win over the environment variables in brackets):
  --node-id ID        the node's id [EXECUTOR_NODE_ID] (required)
  --master URL        the core services' URL as this device reaches it
                      [EXECUTOR_MASTER_URL] (required)
  --token-file FILE   a file holding the node's token [EXECUTOR_TOKEN_FILE]
  --token TOKEN       the token itself [EXECUTOR_TOKEN]; visible to other local users
                      while this runs: prefer --token-file. One of the two is required.
  --run-id ID         the run's id [EXECUTOR_RUN_ID] (default: the agent makes one)
  --on-complete WHAT  none or poweroff, after the report [EXECUTOR_ON_COMPLETE]
                      (default: none)
  --env KEY=VALUE     a further node.env line; repeatable
  These agent variables are also written to node.env when set:
$(printf '%s\n' $AGENT_VARS | sed 's/^/    /')

Other:
  --print-env         print the node.env this would write, and stop (no root needed)
  --uninstall         stop and remove the package, its unit, its user and node.env;
                      the agent's state ($STATE_DIR) is kept
  --purge             with --uninstall: remove the agent's state as well
  -h, --help          this help

Exit status: 0 done; 1 an install step failed; 2 bad usage or identity;
3 this system cannot take the node.
EOF
}

# The value as node.env writes it: double-quoted, with \ " $ and ` escaped, which sh and
# systemd's EnvironmentFile= both undo (the same syntax the cloud-init seed writes).
quote() {
  printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"$`]/\\&/g')"
}

check_value() {
  case $2 in
    *"$NL"* | *"$CR"*) usage_error "the value of $1 contains a line break" ;;
  esac
}

check_key() {
  case $1 in
    "" | [0-9]* | *[!A-Za-z0-9_]*) usage_error "invalid variable name '$1'" ;;
  esac
}

check_id() {
  # Node and run ids go into URLs, host names and file names.
  if ! printf '%s' "$2" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9_.-]{0,62}'; then
    usage_error "invalid $1 '$2' (1-63 of letters, digits, '.', '_', '-', starting with a letter or digit)"
  fi
}

line() {
  check_key "$1"
  check_value "$1" "$2"
  printf '%s=%s\n' "$1" "$(quote "$2")"
}

render_env() {
  line EXECUTOR_NODE_ID "$node_id"
  [ -z "$run_id" ] || line EXECUTOR_RUN_ID "$run_id"
  line EXECUTOR_MASTER_URL "$master"
  line EXECUTOR_TOKEN "$token"
  line EXECUTOR_ON_COMPLETE "$on_complete"
  for var in $AGENT_VARS; do
    eval "set_=\${$var+x} value=\${$var-}"
    [ -z "$set_" ] || line "$var" "$value"
  done
  printf '%s' "$extra_env"
}

parse_args() {
  node_id=${EXECUTOR_NODE_ID-}
  master=${EXECUTOR_MASTER_URL-}
  token=${EXECUTOR_TOKEN-}
  token_file=${EXECUTOR_TOKEN_FILE-}
  run_id=${EXECUTOR_RUN_ID-}
  on_complete=${EXECUTOR_ON_COMPLETE:-none}
  extra_env=
  action=install
  purge=no
  while [ $# -gt 0 ]; do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --node-id | --master | --token | --token-file | --run-id | --on-complete | --env)
        [ $# -ge 2 ] || usage_error "$1 needs a value"
        case $1 in
          --node-id) node_id=$2 ;;
          --master) master=$2 ;;
          --token) token=$2 ;;
          --token-file) token_file=$2 ;;
          --run-id) run_id=$2 ;;
          --on-complete) on_complete=$2 ;;
          --env) add_env "$2" ;;
        esac
        shift 2 ;;
      --print-env) action=print-env; shift ;;
      --uninstall) action=uninstall; shift ;;
      --purge) purge=yes; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  if [ "$purge" = yes ] && [ "$action" != uninstall ]; then
    usage_error "--purge goes with --uninstall"
  fi
}

add_env() {
  case $1 in
    *=*) ;;
    *) usage_error "--env '$1' is not of the form KEY=VALUE" ;;
  esac
  key=${1%%=*}
  check_key "$key"
  for reserved in $RESERVED; do
    [ "$key" != "$reserved" ] || usage_error "--env cannot set $key: use its own option"
  done
  extra_env="$extra_env$(line "$key" "${1#*=}")$NL"
}

check_identity() {
  [ -n "$node_id" ] || usage_error "no node id: give --node-id or EXECUTOR_NODE_ID"
  check_id "node id" "$node_id"
  [ -n "$master" ] || usage_error "no master URL: give --master or EXECUTOR_MASTER_URL"
  case $master in
    http://?* | https://?*) ;;
    *) usage_error "invalid master URL '$master' (an http:// or https:// URL)" ;;
  esac
  [ -z "$run_id" ] || check_id "run id" "$run_id"
  case $on_complete in
    none | poweroff) ;;
    *) usage_error "invalid on-complete action '$on_complete' (none or poweroff)" ;;
  esac
  if [ -z "$token" ] && [ -n "$token_file" ]; then
    [ -r "$token_file" ] || usage_error "cannot read the token file $token_file"
    token=$(cat "$token_file")
  fi
  [ -n "$token" ] || usage_error "no token: give --token-file or --token (or EXECUTOR_TOKEN_FILE, EXECUTOR_TOKEN)"
}

check_root() {
  [ "$(id -u)" -eq 0 ] || fail 3 "run me as root (e.g. with sudo)"
}

check_system() {
  family=
  if [ -r /etc/os-release ]; then
    family=$(. /etc/os-release && printf '%s %s' "${ID-}" "${ID_LIKE-}")
  fi
  case " $family " in
    *" debian "* | *" ubuntu "*) ;;
    *) fail 3 "this system is not Debian or Ubuntu (os-release: '${family% }'); the node package needs dpkg and apt" ;;
  esac
  command -v dpkg >/dev/null 2>&1 || fail 3 "dpkg is missing; the node package needs a Debian-family system"
  # The way systemd itself tells whether it is the running init.
  [ -d /run/systemd/system ] || fail 3 "systemd is not running here; the node runs as a systemd service"
  arch=$(dpkg --print-architecture)
  [ "$arch" = "$DEBARCH" ] || fail 3 "this installer is for $TARGET ($DEBARCH) but this system is $arch; bake one with --target for it"
  [ -x "$PYTHON" ] || fail 3 "$PYTHON is missing; install python3 (>= $PYTHON_MIN)"
  if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$PYTHON_MIN'.split('.'))))"; then
    have=$("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown)
    fail 3 "Python $have at $PYTHON is older than $PYTHON_MIN, which the executor needs"
  fi
  if [ -n "$PYTHON_BELOW" ] &&
    ! "$PYTHON" -c "import sys; sys.exit(sys.version_info >= tuple(map(int, '$PYTHON_BELOW'.split('.'))))"; then
    have=$("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown)
    fail 3 "Python $have at $PYTHON is too new: the pipeline's wheels in this installer are built for Python $PYTHON_MIN"
  fi
}

installed_version() {
  dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$PACKAGE" 2>/dev/null | sed -n 's/^ii *//p'
}

unpack_package() {
  # Checked before anything on the system changes.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  deb="$tmp/$DEB_NAME"
  payload > "$deb" || fail 1 "cannot unpack the embedded package into $tmp"
  actual=$(sha256sum "$deb" | cut -d' ' -f1)
  [ "$actual" = "$DEB_SHA256" ] || fail 1 "the embedded package is damaged (sha256 $actual, expected $DEB_SHA256); download install.sh again"
}

install_package() {
  say "installing $PACKAGE $VERSION"
  DEBIAN_FRONTEND=noninteractive dpkg --install "$deb" >&2 || fail 1 "dpkg could not install $PACKAGE (see above)"
}

write_node_env() {
  # Written next to its final name, then renamed: never a half-written node.env.
  install -d -m 0755 -o root -g root "${NODE_ENV%/*}"
  umask 077
  render_env > "$NODE_ENV.new"
  chmod 0600 "$NODE_ENV.new"
  mv -f "$NODE_ENV.new" "$NODE_ENV"
}

do_install() {
  check_identity
  check_root
  check_system
  unpack_package
  changed=no
  new_env=$(render_env)
  if [ ! -f "$NODE_ENV" ] || [ "$(cat "$NODE_ENV")" != "$new_env" ]; then
    write_node_env
    say "wrote $NODE_ENV"
    changed=yes
  fi
  if [ "$(installed_version)" != "$VERSION" ]; then
    install_package
    changed=yes
  fi
  if ! systemctl is-enabled --quiet "$UNIT"; then
    systemctl enable --quiet "$UNIT"
    say "enabled $UNIT"
    changed=yes
  fi
  if [ "$changed" = yes ]; then
    systemctl restart "$UNIT" || fail 1 "$UNIT did not start; see: journalctl -u $UNIT"
    say "started $UNIT: node $node_id reports to $master"
  else
    say "nothing to change: $PACKAGE $VERSION is installed with this node.env"
  fi
}

do_uninstall() {
  check_root
  command -v dpkg >/dev/null 2>&1 || fail 3 "dpkg is missing; nothing of $PACKAGE can be installed here"
  if dpkg-query -W "$PACKAGE" >/dev/null 2>&1; then
    # The package's postrm removes its user and node.env on purge, and the agent's
    # state unless FLEETBAKE_KEEP_STATE is set.
    if [ "$purge" = yes ]; then
      dpkg --purge "$PACKAGE" >&2 || fail 1 "dpkg could not remove $PACKAGE (see above)"
      say "removed $PACKAGE, its user, node.env and the agent's state"
    else
      FLEETBAKE_KEEP_STATE=1 dpkg --purge "$PACKAGE" >&2 || fail 1 "dpkg could not remove $PACKAGE (see above)"
      say "removed $PACKAGE, its user and node.env (state kept; --purge removes it)"
    fi
  elif [ "$purge" = yes ] && [ -d "$STATE_DIR" ] && [ ! -L "$STATE_DIR" ]; then
    # What an earlier --uninstall kept.
    rm -rf "$STATE_DIR"
    say "$PACKAGE is not installed; removed the agent's state $STATE_DIR"
  else
    say "$PACKAGE is not installed; nothing to remove"
  fi
  # A unit that failed stays listed until told; its file is gone now.
  systemctl reset-failed "$UNIT" >/dev/null 2>&1 || true
}

@PAYLOAD_FUNCTION@

main() {
  parse_args "$@"
  case $action in
    print-env)
      check_identity
      text=$(render_env)  # all or nothing: a refused value prints no half file
      printf '%s\n' "$text" ;;
    uninstall) do_uninstall ;;
    install) do_install ;;
  esac
}

main "$@"
