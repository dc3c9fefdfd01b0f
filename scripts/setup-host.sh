#!/usr/bin/env bash
# Install and start what the image factory and its tests need on a Debian 12 host:
# apt packages (only those missing), binfmt_misc for foreign-architecture chroots,
# and libvirtd. Idempotent; safe to run on every `make`.
set -euo pipefail

APT_PACKAGES=(
  packer qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64 seabios ipxe-qemu
  mmdebstrap arch-test qemu-user-static binfmt-support xorriso mtools dosfstools e2fsprogs fdisk zstd
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config libxml2-utils
  python3-venv python3-dev gcc make git
  vagrant vagrant-libvirt
  cloud-init
  postgresql
  lintian
  docker-registry skopeo umoci
  runc iproute2
  openssh-server socat
)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# cloud-init is here only for `cloud-init schema` in the tests. Unless the host already
# uses it, disable it before it is installed, so it never runs on this host at boot.
if ! dpkg-query -W -f='${Status}' cloud-init 2>/dev/null | grep -q "install ok installed"; then
  sudo_ mkdir -p /etc/cloud && sudo_ touch /etc/cloud/cloud-init.disabled
fi

# openssh-server is here only for sshd binaries the tests start on loopback ports of their
# own. Unless the host already runs it, keep Debian's system sshd from ever starting.
if ! dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed"; then
  sudo_ mkdir -p /etc/ssh && sudo_ touch /etc/ssh/sshd_not_to_be_run
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  sudo_ apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# binfmt_misc lets mmdebstrap run foreign-architecture (arm64) maintainer scripts.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  sudo_ mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || echo "setup-host: warning: cannot mount binfmt_misc" >&2
fi
if [ -e /proc/sys/fs/binfmt_misc/status ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  sudo_ update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || echo "setup-host: warning: cannot register qemu-aarch64 with binfmt_misc" >&2
fi

# /dev/kvm as Debian's udev rule sets it (root:kvm 0660). Without udev (containers) it is
# root-only: libvirtd then sees KVM when it probes QEMU (as root) but not when it checks
# its cache (as libvirt-qemu), and re-probes QEMU on every call (a define took 90 s).
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  sudo_ chgrp kvm /dev/kvm && sudo_ chmod 0660 /dev/kvm || echo "setup-host: warning: cannot set /dev/kvm permissions" >&2
fi

# A daemon started from here must not keep the caller's open files: run under
# `flock LOCK make test`, libvirtd held the lock for good, and a test that takes the same
# lock waited forever. (sudo closes them itself; root runs the command directly.)
daemon() {
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    "$@"
  )
}

# libvirtd: started directly when no init system manages it (containers, CI).
if ! pgrep -x libvirtd >/dev/null 2>&1; then
  sudo_ mkdir -p /run/libvirt
  pgrep -x virtlogd >/dev/null 2>&1 || daemon sudo_ virtlogd -d || true
  daemon sudo_ libvirtd -d || echo "setup-host: warning: libvirtd did not start" >&2
fi
