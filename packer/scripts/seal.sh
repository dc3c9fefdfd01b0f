#!/bin/sh
# Seal the image so every clone is a new instance, then power off. Packer runs this as
# its shutdown command, so the build key is removed only at the very end.
set -eu
rm -rf /var/tmp/fleetbake /var/tmp/fleetbake-out
# New SSH host keys at first boot (cloud-init, or fleetbake-ssh-keygen.service).
rm -f /etc/ssh/ssh_host_*
# Run cloud-init afresh on the next boot, from the node's own seed.
cloud-init clean --logs
# No trace of the build's identity: the node's seed names it.
echo localhost > /etc/hostname
# An empty machine-id makes systemd generate a new one at first boot.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
passwd --lock root >/dev/null
# Logs and caches of the build.
journalctl --relinquish-var >/dev/null 2>&1 || true
rm -rf /var/log/journal/* /var/lib/systemd/random-seed
find /var/log -type f -exec truncate -s 0 {} +
rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*
# The build key last.
rm -rf /root/.ssh
sync
systemctl poweroff --no-block
