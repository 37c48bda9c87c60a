"""The guests' golden root filesystem: Debian bookworm with systemd, sshd, sudo, sshfs, python3.

Built once with debootstrap and kept under the cache directory, keyed by a hash of the package
list and of the customisation below; rebuilt when either changes. Guests boot it read-only
through overlayfs, so each guest costs only its own changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from sandbox import layout

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "iproute2",
    "sshfs",
    "fuse3",
    "e2fsprogs",
    "util-linux",
    "mount",
    "kmod",
    "procps",
    "python3",
    "python3-venv",
    "python3-pip",
    "ca-certificates",
    "curl",
    "less",
    "iputils-ping",
    "openssl",
    "psmisc",
]

#: The boot unit that stands in for udev: device nodes, by-id links, fstab mounts.
DISKS_SCRIPT = r"""#!/bin/sh
# Plug the block devices the host lists in /etc/sandbox-disks ("name major minor serial") and
# mount fstab's block devices: no udev runs in the container and systemd's fstab generator
# skips block devices there.
set -u
[ -e /dev/fuse ] || { mknod /dev/fuse c 10 229; chmod 0666 /dev/fuse; }
if [ -f /etc/sandbox-disks ]; then
  while read -r name major minor serial; do
    [ -n "$name" ] || continue
    [ -e "/dev/$name" ] || { mknod "/dev/$name" b "$major" "$minor"; chmod 0660 "/dev/$name"; chgrp disk "/dev/$name"; }
    if [ -n "$serial" ] && [ "$serial" != "-" ]; then
      mkdir -p /dev/disk/by-id
      ln -sfn "../../$name" "/dev/disk/by-id/virtio-$serial"
    fi
    uuid=$(blkid -p -s UUID -o value "/dev/$name" 2>/dev/null || true)
    if [ -n "$uuid" ]; then mkdir -p /dev/disk/by-uuid; ln -sfn "../../$name" "/dev/disk/by-uuid/$uuid"; fi
  done < /etc/sandbox-disks
fi
mount -a -t ext4,ext3,ext2,xfs,btrfs,vfat 2>/dev/null || true
exit 0
"""

DISKS_UNIT = """[Unit]
Description=Sandbox block devices (what udev does on a VM)
DefaultDependencies=no
After=systemd-tmpfiles-setup-dev.service
Before=local-fs.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/sandbox-disks
[Install]
WantedBy=local-fs.target
"""

CUSTOMISE = r"""set -eu
useradd -m -s /bin/bash -u 1000 -p '*' -G sudo ubuntu || true
echo 'ubuntu ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-cloud-init-users
chmod 0440 /etc/sudoers.d/90-cloud-init-users
mkdir -p /etc/ssh/sshd_config.d
printf 'PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\nUseDNS no\n' > /etc/ssh/sshd_config.d/10-sandbox.conf
rm -f /etc/ssh/ssh_host_*
echo '# /etc/fstab: static file system information.' > /etc/fstab
chmod 0755 /usr/local/sbin/sandbox-disks
ln -sf /etc/systemd/system/sandbox-disks.service /etc/systemd/system/local-fs.target.wants/sandbox-disks.service
systemctl enable ssh.service >/dev/null 2>&1 || true
systemctl mask systemd-networkd-wait-online.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer >/dev/null 2>&1 || true
mkdir -p /etc/systemd/system/network-online.target.wants
echo 'user_allow_other' >> /etc/fuse.conf
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""


def build_key() -> str:
    text = "\n".join([SUITE, MIRROR, *PACKAGES, DISKS_SCRIPT, DISKS_UNIT, CUSTOMISE])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rootfs_dir() -> Path:
    return layout.CACHE_DIR / "rootfs" / build_key()


def ready() -> bool:
    return (rootfs_dir() / ".complete").exists()


def build(log=print) -> Path:  # type: ignore[no-untyped-def]
    """Build the rootfs if this key has none yet. Takes about a minute on 2 cores."""
    target = rootfs_dir()
    if ready():
        return target
    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"building the guest root filesystem ({len(PACKAGES)} packages, debootstrap)")
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(tmp),
            MIRROR,
        ],
        check=True,
        capture_output=True,
    )
    (tmp / "usr/local/sbin").mkdir(parents=True, exist_ok=True)
    (tmp / "usr/local/sbin/sandbox-disks").write_text(DISKS_SCRIPT)
    (tmp / "etc/systemd/system/local-fs.target.wants").mkdir(parents=True, exist_ok=True)
    (tmp / "etc/systemd/system/sandbox-disks.service").write_text(DISKS_UNIT)
    subprocess.run(
        ["chroot", str(tmp), "/bin/sh", "-c", CUSTOMISE], check=True, capture_output=True
    )
    (tmp / ".complete").write_text(build_key() + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in target.parent.iterdir():  # older builds are no longer used
        if old.name != target.name and not old.name.endswith(".building"):
            shutil.rmtree(old, ignore_errors=True)
    log(f"guest root filesystem ready in {time.monotonic() - t0:.0f} s")
    return target
