"""Before a guest boots: host packages and the golden image, the guest's overlay layers and
first-boot files, its network namespace and its mounted root."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from sandbox import latency, layout, mirror
from sandbox.guests import rootfs
from sandbox.guests.configdrive import seed_files, write_seed
from sandbox.guests.state import GuestSpec, _dir, _load, _mounted, _names, _run, _save


# -- installation ------------------------------------------------------------------------------
def install() -> None:
    """Debian packages for guests, and the golden root filesystem (built once, cached)."""
    needed = {
        "debootstrap": "debootstrap",
        "systemd-nspawn": "systemd-container",
        "mkfs.ext4": "e2fsprogs",
        "ssh-keygen": "openssh-client",
        "ip": "iproute2",
        "losetup": "mount",
        "nsenter": "util-linux",
    }
    missing = sorted({pkg for cmd, pkg in needed.items() if shutil.which(cmd) is None})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if _run("apt-get", "install", "-y", "-q", *missing, check=False, env=env).returncode:
            _run("apt-get", "update", "-q", env=env)
            _run("apt-get", "install", "-y", "-q", *missing, env=env)
    rootfs.build()


# -- preparing a guest -------------------------------------------------------------------------
def _sshd_delay(upper: Path, seconds: float) -> None:
    """sshd starts ``seconds`` late at every boot (a cloud's 30-90 s until SSH answers)."""
    dropin = upper / "etc/systemd/system/ssh.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "50-sandbox-delay.conf").write_text(
        f"[Service]\nExecStartPre=/bin/sleep {seconds:g}\nTimeoutStartSec={int(seconds) + 90}\n"
    )


def _copy_dir_attrs(lower: Path, upper: Path) -> None:
    """An overlay shows an upper directory's owner and mode: take them from the golden copy."""
    st = lower.stat()
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)


def _prepare(spec: GuestSpec, seed: Path | None = None) -> None:
    """Before the first boot: the overlay's upper layer with what the hypervisor and the cloud
    give a VM (hostname, config drive seed), and its ephemeral disk. The rest is cloud-init's."""
    d = _dir(spec.name)
    lower = rootfs.build()
    upper = d / "upper"
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    etc = upper / "etc"
    etc.mkdir(exist_ok=True)
    _copy_dir_attrs(lower / "etc", etc)
    (etc / "hostname").write_text(spec.hostname + "\n")
    (etc / "hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {spec.hostname}\n{spec.ip} {spec.hostname}\n"
        "::1 localhost ip6-localhost ip6-loopback\n"
    )
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (etc / "machine-id").write_text(hashlib.md5(spec.name.encode()).hexdigest() + "\n")
    mirror.prepare_guest(upper)  # apt source and key of the sandbox mirror; dpkg-lock fault
    write_seed(upper, seed if seed is not None else seed_files(spec))
    delay = spec.sshd_delay if spec.sshd_delay is not None else latency.get("sshd_delay")
    if delay > 0:
        _sshd_delay(upper, delay)
    disks: list[dict] = []
    if spec.ephemeral_gb > 0:
        # formatted and labelled as Nova's libvirt driver makes it; cloud-init mounts it at /mnt
        img = d / "ephemeral0.img"
        with open(img, "wb") as fh:
            fh.truncate(spec.ephemeral_gb * 2**30)
        _run("mkfs.ext4", "-q", "-F", "-L", "ephemeral0", "-E", "nodiscard", str(img))
        disks.append({"dev": "vdb", "path": str(img), "serial": "-", "ephemeral": True})
    record = {"spec": asdict(spec), "names": _names(spec.name), "lower": str(lower), "disks": disks}
    _save(spec.name, record)


def _ensure_netns(name: str, spec: GuestSpec) -> None:
    names = _load(name)["names"]
    ns, host_if, peer = names["netns"], names["veth"], names["peer"]
    if not Path(f"/run/netns/{ns}").exists():
        _run("ip", "netns", "add", ns)
    if _run("ip", "-n", ns, "link", "show", "eth0", check=False).returncode != 0:
        _run("ip", "link", "del", host_if, check=False)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer, "netns", ns)
        _run("ip", "-n", ns, "link", "set", peer, "name", "eth0")
    _run("ip", "link", "set", host_if, "master", layout.TENANT_BRIDGE, "up")
    _run("ip", "-n", ns, "link", "set", "eth0", "address", spec.mac)
    addr = f"{spec.ip}/{spec.prefix}"
    if f" {addr} " not in _run("ip", "-n", ns, "-o", "addr", "show", "dev", "eth0").stdout:
        _run("ip", "-n", ns, "addr", "flush", "dev", "eth0")
        _run("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
    _run("ip", "-n", ns, "link", "set", "eth0", "up")
    _run("ip", "-n", ns, "link", "set", "lo", "up")


def _mount_overlay(name: str) -> None:
    d = _dir(name)
    if _mounted(d / "root"):
        return
    # the build the guest was created from (a VM's disk does not change with its image)
    lower = Path(_load(name).get("lower") or "/nonexistent")
    if not (lower / ".complete").exists():
        lower = rootfs.build()
    opts = f"lowerdir={lower},upperdir={d / 'upper'},workdir={d / 'work'}"
    _run("mount", "-t", "overlay", "overlay", "-o", opts, str(d / "root"))
