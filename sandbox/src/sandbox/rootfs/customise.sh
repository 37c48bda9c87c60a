#!/bin/sh
# Runs inside the freshly debootstrapped root (chroot) to make it look like Ubuntu's server cloud
# image before its first boot: no user yet and no SSH host keys (cloud-init makes both at first
# boot), cloud-init set up as Ubuntu sets it, key-only sshd, apt's timers and unattended-upgrades
# enabled, no package lists and no package sources (the guest has no internet; the sandbox adds
# its own mirror per guest), and the sandbox-disks boot unit. The host copies sandbox-disks,
# sandbox-disks.service and cloud-init.cfg into place before running this.
set -eu
mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/60-cloudimg-settings.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
CONF
rm -f /etc/ssh/ssh_host_*

echo '# /etc/fstab: static file system information.' > /etc/fstab
: > /etc/sandbox-disks

# apt-daily, apt-daily-upgrade and unattended-upgrades on, as in Ubuntu's image
cat > /etc/apt/apt.conf.d/20auto-upgrades <<'CONF'
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
CONF
systemctl unmask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
systemctl enable apt-daily.timer apt-daily-upgrade.timer unattended-upgrades.service

chmod 0755 /usr/local/sbin/sandbox-disks
systemctl enable sandbox-disks.service ssh.service
systemctl enable cloud-init-local.service cloud-init.service cloud-config.service \
  cloud-final.service
# Nothing to wait for or to fetch: the guests have no internet and no network manager.
systemctl mask systemd-networkd-wait-online.service systemd-timesyncd.service \
  e2scrub_all.timer fstrim.timer getty@tty1.service console-getty.service

# no package sources and empty package lists, as on a fresh VM with no internet
: > /etc/apt/sources.list
rm -f /etc/apt/sources.list.d/*
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
mkdir -p /var/lib/apt/lists/partial
# no trace of the build in cloud-init's state
rm -rf /var/lib/cloud/* /var/log/cloud-init*.log
