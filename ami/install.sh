#!/bin/sh
# Installs the falconet executor on a Debian or Ubuntu machine; run as root (Packer runs it
# on the build instance).  FALCONET_SPEC is what pip installs (default: falconet).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3-venv sudo
id falconet >/dev/null 2>&1 ||
    useradd --system --create-home --home-dir /var/lib/falconet --shell /usr/sbin/nologin falconet
python3 -m venv /opt/falconet
/opt/falconet/bin/pip install --quiet --upgrade pip
/opt/falconet/bin/pip install --quiet "${FALCONET_SPEC:-falconet}"
install -m 0644 /tmp/falconet-executor.service /etc/systemd/system/falconet-executor.service
install -m 0440 /tmp/falconet-sudoers /etc/sudoers.d/falconet
visudo -cf /etc/sudoers.d/falconet
systemctl enable falconet-executor.service
# Every instance launched from the image must read its own user-data on its first boot.
cloud-init clean --logs || true
