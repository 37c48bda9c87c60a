"""Guests that look like Ubuntu cloud VMs: systemd-nspawn containers with systemd as PID 1.

Each guest has its own network namespace (a veth on the tenant bridge, its fixed IP, no default
route), an overlay on the golden root filesystem, per-guest SSH host keys, the instance's key in
``ubuntu``'s authorized_keys, and block devices plugged as /dev/vdX with by-id links as a KVM
guest shows them. A small supervisor process per guest relaunches it after ``sudo reboot``
(nspawn exits 133) and records a power-off, so the guest behaves as a VM does.

The Nova driver of the sandbox cloud calls these functions; they know nothing of Nova.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox import latency, layout, net
from sandbox.guests import rootfs

GUESTS_DIR = layout.STATE_DIR / "guests"


@dataclass
class GuestSpec:
    name: str
    hostname: str
    mac: str
    ip: str
    prefix: int
    gateway: str
    authorized_keys: str
    ephemeral_gb: int = 0


class GuestError(RuntimeError):
    pass


# -- small helpers -----------------------------------------------------------------------------
def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    p = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise GuestError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _dir(name: str) -> Path:
    return GUESTS_DIR / name


def _short(name: str) -> str:
    return name.replace("-", "")[:10]


def _netns(name: str) -> str:
    return f"sg{_short(name)}"


def _veth(name: str) -> tuple[str, str]:
    s = _short(name)
    return f"sh{s}", f"sv{s}"


def _load(name: str) -> dict:
    return json.loads((_dir(name) / "guest.json").read_text())


def _save(name: str, data: dict) -> None:
    path = _dir(name) / "guest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # a zombie is not alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
    except OSError:
        return None
    return pid


def _mounted(path: Path) -> bool:
    return _run("mountpoint", "-q", str(path), check=False).returncode == 0


def _container_pid1(name: str) -> int | None:
    nspawn = _pid(_dir(name) / "nspawn.pid")
    if nspawn is None:
        return None
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


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
def _host_keys(upper: Path, hostname: str) -> None:
    ssh = upper / "etc/ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    for kind in ("ed25519", "ecdsa", "rsa"):
        key = ssh / f"ssh_host_{kind}_key"
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{hostname}", "-f", str(key))


def _prepare(spec: GuestSpec) -> None:
    d = _dir(spec.name)
    upper = d / "upper"
    if (d / "guest.json").exists():
        data = _load(spec.name)
        data["spec"] = asdict(spec) | {"ephemeral_gb": data["spec"]["ephemeral_gb"]}
        _save(spec.name, data)
        return
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    _host_keys(upper, spec.hostname)
    etc = upper / "etc"
    (etc / "hostname").write_text(spec.hostname + "\n")
    (etc / "hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {spec.hostname}\n{spec.ip} {spec.hostname}\n"
        "::1 localhost ip6-localhost ip6-loopback\n"
    )
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (etc / "machine-id").write_text(hashlib.md5(spec.name.encode()).hexdigest() + "\n")
    home = upper / "home/ubuntu/.ssh"
    home.mkdir(parents=True, exist_ok=True)
    (home / "authorized_keys").write_text(
        spec.authorized_keys.strip() + "\n" if spec.authorized_keys.strip() else ""
    )
    os.chmod(home, 0o700)
    os.chmod(home / "authorized_keys", 0o600)
    for path in (home.parent, home, home / "authorized_keys"):
        os.chown(path, 1000, 1000)
    disks: list[dict] = []
    fstab = "# /etc/fstab: static file system information.\n"
    if spec.ephemeral_gb > 0:
        img = d / "ephemeral.img"
        with open(img, "wb") as fh:
            fh.truncate(spec.ephemeral_gb * 2**30)
        _run("mkfs.ext4", "-q", "-F", "-L", "ephemeral0", str(img))
        disks.append({"dev": "vdb", "path": str(img), "serial": "-", "ephemeral": True})
        fstab += "/dev/vdb /mnt ext4 defaults,nofail,comment=cloudconfig 0 2\n"
    (etc / "fstab").write_text(fstab)
    _save(spec.name, {"spec": asdict(spec), "disks": disks})


def _ensure_netns(spec: GuestSpec) -> None:
    ns = _netns(spec.name)
    host_if, guest_if = _veth(spec.name)
    if _run("ip", "netns", "exec", ns, "true", check=False).returncode != 0:
        _run("ip", "netns", "add", ns)
    if _run("ip", "link", "show", host_if, check=False).returncode != 0:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", guest_if, "netns", ns)
        _run("ip", "-n", ns, "link", "set", guest_if, "name", "eth0")
    _run("ip", "link", "set", host_if, "master", layout.TENANT_BRIDGE, "up")
    _run("ip", "-n", ns, "link", "set", "eth0", "address", spec.mac)
    addr = f"{spec.ip}/{spec.prefix}"
    if addr not in _run("ip", "-n", ns, "-o", "addr", "show", "dev", "eth0").stdout:
        _run("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
    _run("ip", "-n", ns, "link", "set", "eth0", "up")
    _run("ip", "-n", ns, "link", "set", "lo", "up")


def _losetup(path: str) -> str:
    found = _run("losetup", "-j", path, check=False).stdout.strip()
    if found:
        return found.split(":", 1)[0]
    return _run("losetup", "--find", "--show", path).stdout.strip()


def _disks_file(name: str, disks: list[dict]) -> str:
    lines = []
    for disk in disks:
        st = os.stat(disk["loop"])
        serial = disk["serial"][:20] if disk["serial"] != "-" else "-"
        lines.append(f"{disk['dev']} {os.major(st.st_rdev)} {os.minor(st.st_rdev)} {serial}")
    return "\n".join(lines) + ("\n" if lines else "")


def _plug_all(name: str) -> list[dict]:
    """Loop devices for every recorded disk, and the list the guest's boot unit reads."""
    data = _load(name)
    for disk in data["disks"]:
        disk["loop"] = _losetup(disk["path"])
    _save(name, data)
    root = _dir(name) / "root"
    (root / "etc/sandbox-disks").write_text(_disks_file(name, data["disks"]))
    return data["disks"]


def _mount_overlay(name: str) -> None:
    d = _dir(name)
    if _mounted(d / "root"):
        return
    lower = rootfs.build()
    _run(
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={d / 'upper'},workdir={d / 'work'}",
        str(d / "root"),
    )


# -- life cycle --------------------------------------------------------------------------------
def power_state(name: str) -> str:
    d = _dir(name)
    if not (d / "guest.json").exists():
        return "absent"
    if _pid(d / "supervisor.pid") and _pid(d / "nspawn.pid"):
        return "running"
    return "shutdown"


def _wait_ready(spec: GuestSpec, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if power_state(spec.name) != "running" and time.monotonic() > deadline - timeout + 5:
            raise GuestError(f"guest {spec.name} stopped while booting: {_tail(spec.name)}")
        try:
            with socket.create_connection((spec.ip, 22), timeout=2) as s:
                s.settimeout(5)
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise GuestError(
                f"guest {spec.name} did not answer SSH within {timeout:.0f} s: {_tail(spec.name)}"
            )
        time.sleep(0.2)
    pid1 = _container_pid1(spec.name)
    if pid1:
        left = max(5, deadline - time.monotonic())
        _run(
            "nsenter",
            "-t",
            str(pid1),
            "-a",
            "systemctl",
            "is-system-running",
            "--wait",
            check=False,
            timeout=left,
        )


def _tail(name: str) -> str:
    try:
        text = (_dir(name) / "console.log").read_bytes()[-600:]
        return text.decode(errors="replace")
    except OSError:
        return "(no console output)"


def start_guest(spec: GuestSpec, timeout: float = 90) -> None:
    """Create or power on the guest; return once its sshd answers and boot has settled."""
    if power_state(spec.name) == "running":
        return
    first_boot = not (_dir(spec.name) / "guest.json").exists()
    if first_boot and latency.get("boot"):
        time.sleep(latency.get("boot"))  # benchmarks: a cloud's build time
    net.ensure_network()
    GUESTS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        _prepare(spec)
        _ensure_netns(spec)
        _mount_overlay(spec.name)
        _plug_all(spec.name)
        d = _dir(spec.name)
        (d / "power").write_text("on\n")
        log = open(d / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.guests.supervisor", spec.name],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        log.close()
        (d / "supervisor.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while not _pid(d / "nspawn.pid"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"guest {spec.name} did not start: {_tail(spec.name)}")
            time.sleep(0.05)
        _wait_ready(spec, timeout)
    except Exception:
        with contextlib.suppress(Exception):
            destroy_guest(spec.name)
        raise


def _signal_nspawn(name: str, sig: int) -> None:
    pid = _pid(_dir(name) / "nspawn.pid")
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_guest(name: str, timeout: float = 30) -> None:
    """Power off: a clean shutdown, then a kill. Disk state and devices stay recorded."""
    d = _dir(name)
    if power_state(name) == "absent":
        return
    (d / "power").write_text("off\n")
    _signal_nspawn(name, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid(d / "nspawn.pid") and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_nspawn(name, signal.SIGKILL)
    sup = _pid(d / "supervisor.pid")
    deadline = time.monotonic() + 10
    while sup and _pid(d / "supervisor.pid") and time.monotonic() < deadline:
        time.sleep(0.05)
    if sup and _pid(d / "supervisor.pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGKILL)


def reboot_guest(name: str, hard: bool = False) -> None:
    d = _dir(name)
    if power_state(name) != "running":
        raise GuestError(f"guest {name} is not running")
    old = _pid(d / "nspawn.pid")
    (d / "power").write_text("reboot\n")
    _signal_nspawn(name, signal.SIGKILL if hard else signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = _pid(d / "nspawn.pid")
        if new and new != old:
            break
        time.sleep(0.1)
    data = _load(name)
    _wait_ready(GuestSpec(**data["spec"]), 90)


def _release(name: str) -> None:
    """Unmount, free loop devices and remove the namespace (the guest must be stopped)."""
    d = _dir(name)
    root = d / "root"
    for _ in range(3):
        if not _mounted(root):
            break
        _run("umount", "-R", str(root), check=False)
        if _mounted(root):
            _run("umount", "-l", str(root), check=False)
    if (d / "guest.json").exists():
        data = _load(name)
        for disk in data["disks"]:
            if disk.get("loop"):
                _run("losetup", "-d", disk["loop"], check=False)
                disk["loop"] = None
        _save(name, data)
    _run("ip", "netns", "del", _netns(name), check=False)
    _run("ip", "link", "del", _veth(name)[0], check=False)


def destroy_guest(name: str) -> None:
    """Power off and remove everything of the guest. Volume files (Cinder's) stay."""
    if not _dir(name).exists():
        return
    stop_guest(name)
    _release(name)
    shutil.rmtree(_dir(name), ignore_errors=True)


def list_guests() -> list[str]:
    if not GUESTS_DIR.exists():
        return []
    return sorted(p.name for p in GUESTS_DIR.iterdir() if (p / "guest.json").exists())


def cleanup_all() -> None:
    """Stop every guest and release its mounts, loop devices and namespace (disks stay)."""
    for name in list_guests():
        stop_guest(name, timeout=15)
        _release(name)
    # anything left from a crash: namespaces named like ours
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith("sg"):
            _run("ip", "netns", "del", ns, check=False)


# -- volumes -----------------------------------------------------------------------------------
def _guest_exec(name: str, script: str) -> None:
    pid1 = _container_pid1(name)
    if pid1 is None:
        return
    _run("nsenter", "-t", str(pid1), "-m", "sh", "-c", script)


def attach_volume(name: str, path: str, serial: str) -> str:
    """Plug a volume file into the guest as the next free /dev/vdX; returns that name."""
    data = _load(name)
    for disk in data["disks"]:
        if disk["serial"] == serial:
            return f"/dev/{disk['dev']}"
    used = {disk["dev"] for disk in data["disks"]} | {"vda", "vdb"}
    dev = next(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used)
    loop = _losetup(path)
    data["disks"].append({"dev": dev, "path": path, "serial": serial, "loop": loop})
    _save(name, data)
    if _mounted(_dir(name) / "root"):
        (_dir(name) / "root/etc/sandbox-disks").write_text(_disks_file(name, data["disks"]))
    st = os.stat(loop)
    sid = serial[:20]
    _guest_exec(
        name,
        f"[ -e /dev/{dev} ] || mknod /dev/{dev} b {os.major(st.st_rdev)} {os.minor(st.st_rdev)}; "
        f"chmod 0660 /dev/{dev}; chgrp disk /dev/{dev} 2>/dev/null; mkdir -p /dev/disk/by-id; "
        f"ln -sfn ../../{dev} /dev/disk/by-id/virtio-{sid}",
    )
    return f"/dev/{dev}"


def detach_volume(name: str, serial: str) -> None:
    if not (_dir(name) / "guest.json").exists():
        return
    data = _load(name)
    keep, gone = [], []
    for disk in data["disks"]:
        (gone if disk["serial"] == serial else keep).append(disk)
    data["disks"] = keep
    _save(name, data)
    if _mounted(_dir(name) / "root"):
        (_dir(name) / "root/etc/sandbox-disks").write_text(_disks_file(name, keep))
    for disk in gone:
        with contextlib.suppress(GuestError):
            _guest_exec(name, f"rm -f /dev/{disk['dev']} /dev/disk/by-id/virtio-{serial[:20]}")
        if disk.get("loop"):
            _run("losetup", "-d", disk["loop"], check=False)


# -- console -----------------------------------------------------------------------------------
def console_output(name: str) -> bytes:
    d = _dir(name)
    try:
        log = (d / "console.log").read_bytes()
    except OSError:
        log = b""
    lines = []
    for key in sorted((d / "upper/etc/ssh").glob("ssh_host_*_key.pub")):
        out = _run("ssh-keygen", "-l", "-f", str(key), check=False).stdout.strip()
        if out:
            lines.append(out)
    block = (
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        + "\n".join(lines)
        + "\n-----END SSH HOST KEY FINGERPRINTS-----\n"
    )
    return log[-60000:] + b"\n" + block.encode()
