#!/bin/sh
# Install the executor, the pipeline and executor.service from the uploaded artifacts
# (/var/tmp/fleetbake). Runs as root inside the build VM, which has no network.
set -eu
A=/var/tmp/fleetbake
OUT=/var/tmp/fleetbake-out

install -d -m 0755 /opt/executor/lib /etc/executor
install -d -m 0700 /var/lib/executor
tar -xzf "$A/executor-lib.tar.gz" -C /opt/executor/lib
# Importable as `executor` by every python3 on the system, workers included.
echo /opt/executor/lib > /usr/lib/python3/dist-packages/fleetbake-executor.pth
install -m 0755 "$A/executor" /usr/local/bin/executor
install -m 0644 "$A/pipeline.tar.gz" /opt/executor/pipeline.tar.gz
install -m 0644 "$A/executor.service" /etc/systemd/system/executor.service
systemctl enable executor.service

# The image must be able to run what it carries (this also writes the executor's .pyc).
/usr/local/bin/executor validate /opt/executor/pipeline.tar.gz

# Facts for the manifest, fetched by Packer before sealing.
install -d -m 0755 "$OUT"
dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\n' > "$OUT/packages.tsv"
{
  echo "kernel=$(uname -r)"
  echo "python=$(python3 -c 'import platform; print(platform.python_version())')"
  echo "debian=$(cat /etc/debian_version)"
} > "$OUT/guest.env"
