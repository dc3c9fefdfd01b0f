#!/bin/sh
# Install the executor, the pipeline and executor.service from the uploaded artifacts
# (/var/tmp/fleetbake). Runs as root inside the build VM, which has no network.
# Where each goes comes from the environment, set by the Packer template from
# imagefactory/bake/artifacts.py (provision_env), the one place the guest paths are named.
set -eu
A=/var/tmp/fleetbake
OUT=/var/tmp/fleetbake-out
: "${FLEETBAKE_LIB:?}" "${FLEETBAKE_LAUNCHER:?}" "${FLEETBAKE_PIPELINE:?}" "${FLEETBAKE_UNIT:?}"
: "${FLEETBAKE_CONFIG_DIR:?}" "${FLEETBAKE_USER:?}" "${FLEETBAKE_STATE_DIR:?}"

install -d -m 0755 "$FLEETBAKE_LIB" "$FLEETBAKE_CONFIG_DIR"
# The agent and its tasks run as this unprivileged system user; systemd makes its state
# directory (StateDirectory= in the unit), which is also its home.
useradd --system --user-group --no-create-home --home-dir "$FLEETBAKE_STATE_DIR" \
  --shell /usr/sbin/nologin --comment "fleetbake executor agent" "$FLEETBAKE_USER"
tar -xzf "$A/executor-lib.tar.gz" -C "$FLEETBAKE_LIB"
# The executor's own virtual environment (the launcher runs its python, and so do the
# workers): the executor library through a .pth file, the pipeline's wheels installed
# offline, pinned by the sha256 in their lock file. No pip stays behind in it.
python3 -m venv --without-pip "$FLEETBAKE_VENV"
PY="$FLEETBAKE_VENV/bin/python3"
echo "$FLEETBAKE_LIB" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/fleetbake-executor.pth"
if [ -f "$A/wheels/requirements.lock" ]; then
  set -- "$A"/wheels/pip/pip-*.whl
  "$PY" "$1/pip" install --no-index --no-deps --require-hashes --find-links "$A/wheels" \
    --no-cache-dir --disable-pip-version-check --no-input --progress-bar off \
    -r "$A/wheels/requirements.lock"
fi
install -m 0755 "$A/executor" "$FLEETBAKE_LAUNCHER"
install -m 0644 "$A/pipeline.tar.gz" "$FLEETBAKE_PIPELINE"
install -m 0644 "$A/executor.service" "$FLEETBAKE_UNIT"
systemctl enable "$(basename "$FLEETBAKE_UNIT")"

# The image must be able to run what it carries (this also writes the executor's .pyc).
"$FLEETBAKE_LAUNCHER" validate "$FLEETBAKE_PIPELINE"

# Facts for the manifest, fetched by Packer before sealing.
install -d -m 0755 "$OUT"
dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\n' > "$OUT/packages.tsv"
{
  echo "kernel=$(uname -r)"
  echo "python=$(python3 -c 'import platform; print(platform.python_version())')"
  echo "debian=$(cat /etc/debian_version)"
} > "$OUT/guest.env"
