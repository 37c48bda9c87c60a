#!/bin/sh
# Runs inside the freshly debootstrapped root (chroot) to make it look like an Ubuntu cloud
# image after cloud-init: user ubuntu with passwordless sudo, key-only sshd, empty fstab, no
# host keys (each guest gets its own), and the sandbox-disks boot unit. The host copies
# sandbox-disks and sandbox-disks.service into place before running this.
set -eu
useradd -m -s /bin/bash -u 1000 -U -G sudo -p '*' ubuntu
echo 'ubuntu ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-cloud-init-users
chmod 0440 /etc/sudoers.d/90-cloud-init-users

mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/10-sandbox.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
CONF
rm -f /etc/ssh/ssh_host_*

echo '# /etc/fstab: static file system information.' > /etc/fstab
: > /etc/sandbox-disks
echo 'user_allow_other' >> /etc/fuse.conf

chmod 0755 /usr/local/sbin/sandbox-disks
systemctl enable sandbox-disks.service ssh.service
# Nothing to wait for or to fetch: the guests have no internet and no network manager.
systemctl mask systemd-networkd-wait-online.service systemd-timesyncd.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  getty@tty1.service console-getty.service

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
