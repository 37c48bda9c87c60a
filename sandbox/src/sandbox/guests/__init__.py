"""Guests that boot as Ubuntu cloud VMs do: systemd-nspawn containers with systemd as PID 1.

Each guest has its own network namespace (a veth on the tenant bridge with the guest's MAC and
fixed IP, no default route), an overlay on the golden root filesystem (a stock cloud image: no
user, no host keys, cloud-init), and block devices plugged as /dev/vdX with
/dev/disk/by-id/virtio-<serial> links as a KVM guest shows them. Before the first boot the
guest's upper layer gets a config drive seed (/var/lib/cloud/seed/config_drive: Nova's own tree
from the sandbox's Nova driver, or a minimal one from ``write_seed`` for guests started
directly), so cloud-init creates ``ubuntu`` with the instance's key, generates the host keys,
prints their fingerprints on the console, mounts the ephemeral disk at /mnt and runs the
user-data, once per instance. A small supervisor process per guest
(``sandbox.guests.supervisor``, in its own session) runs systemd-nspawn, starts it again after
``sudo reboot`` (nspawn exits 133) and records a power-off, so the guest behaves as a VM.

State lives under ``$STATE_DIR/guests/<name>/``: ``guest.json`` (spec, namespace and interface
names, disks), ``upper/`` and ``work/`` (the overlay's writable layer), ``root/`` (the mounted
overlay), ``console.log``, the supervisor's and nspawn's pid files and the ``power`` file
(``on`` | ``reboot`` | ``off``: what the host asked for). Power state is read from the live
processes, never from memory, so any process (the Nova driver, the tests, ``sandbox down``)
sees the same thing.

The sandbox's Nova driver calls these functions; they know nothing of Nova.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox import latency, layout, locks, mirror, net
from sandbox.guests import cgroups, firewall, rootfs

GUESTS_DIR = layout.STATE_DIR / "guests"
#: Where cloud-init's ConfigDrive datasource reads a config drive's tree without a device.
SEED_DIR = "var/lib/cloud/seed/config_drive"
#: Nova's libvirt driver returns at most this much of the console log (MAX_CONSOLE_BYTES).
MAX_CONSOLE_BYTES = 100 * 1024
#: Exit code of systemd-nspawn when the guest rebooted itself.
REBOOT_EXIT = 133
FUSE_DEV = (10, 229)


@dataclass
class GuestSpec:
    name: str  # unique id; used for directory names (shortened for namespace/interface names)
    hostname: str
    mac: str
    ip: str  # fixed IP inside layout.TENANT_CIDR
    prefix: int  # 24
    gateway: str  # layout.TENANT_GATEWAY (on-link; the guest gets no default route)
    authorized_keys: str  # the instance's key_data (may be empty)
    ephemeral_gb: int = 0  # >0: a sparse ext4 disk shown as /dev/vdb, mounted at /mnt
    user_data: str = ""  # given to cloud-init by the minimal seed (not by Nova's tree)
    #: seconds sshd starts late at each boot; None: the ``sshd_delay`` latency (sandbox.latency)
    sshd_delay: float | None = None


class GuestError(RuntimeError):
    pass


# -- small helpers -----------------------------------------------------------------------------
def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    p = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise GuestError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _dir(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise GuestError(f"bad guest name {name!r}")
    return GUESTS_DIR / name


def _tag() -> str:
    """Short hash of the guests directory: namespaces of another state directory are not ours."""
    return hashlib.sha1(str(GUESTS_DIR).encode()).hexdigest()[:4]


def _netns_prefix() -> str:
    return f"sails-{_tag()}-"


def _names(name: str) -> dict[str, str]:
    """Namespace and interface names for a guest (interfaces: IFNAMSIZ is 15 with the NUL)."""
    h = hashlib.sha1(f"{GUESTS_DIR}/{name}".encode()).hexdigest()[:10]
    return {
        "netns": f"{_netns_prefix()}{h}",
        "veth": f"sg{h}",
        "peer": f"sv{h}",
        "machine": f"sg{h}",
    }


def _guest_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """Held only around short read-modify-write steps of one guest's record."""
    return locks.flock(_dir(name) / ".lock")


def _loop_lock() -> contextlib.AbstractContextManager[None]:
    return locks.flock(GUESTS_DIR / ".loop.lock")


def _legacy_names(name: str) -> dict[str, str]:
    """Names used by records written before guest.json carried them."""
    s = name.replace("-", "")[:10]
    return {"netns": f"sg{s}", "veth": f"sh{s}", "peer": f"sv{s}", "machine": f"sg{s}"}


def _load(name: str) -> dict:
    data = json.loads((_dir(name) / "guest.json").read_text())
    data.setdefault("names", _legacy_names(name))
    return data


def _save(name: str, data: dict) -> None:
    path = _dir(name) / "guest.json"
    tmp = path.with_name(f".guest.json.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pid(path: Path, marker: str) -> int | None:
    """The live process whose pid is in ``path`` and whose command line mentions ``marker``."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid) or not any(marker in arg for arg in _cmdline(pid)):
        return None
    return pid


def _supervisor_pid(name: str) -> int | None:
    return _pid(_dir(name) / "supervisor.pid", str(_dir(name)))


def _nspawn_pid(name: str) -> int | None:
    return _pid(_dir(name) / "nspawn.pid", str(_dir(name) / "root"))


def _container_pid1(name: str) -> int | None:
    """Host pid of the guest's PID 1 (systemd), a child of the nspawn process."""
    nspawn = _nspawn_pid(name)
    if nspawn is None:
        return None
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return int(child)
    return None


def _power_request(name: str) -> str:
    try:
        return (_dir(name) / "power").read_text().strip() or "on"
    except OSError:
        return "off"


def _set_power(name: str, value: str) -> None:
    path = _dir(name) / "power"
    tmp = path.with_name(f".power.{os.getpid()}")
    tmp.write_text(value + "\n")
    tmp.replace(path)


def _mounted(path: Path) -> bool:
    target = str(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4] == target:
                return True
    return False


def _tail(name: str, size: int = 800) -> str:
    out = []
    for log in ("console.log", "supervisor.log"):
        with contextlib.suppress(OSError):
            text = (_dir(name) / log).read_bytes()[-size:].decode(errors="replace").strip()
            if text:
                out.append(f"[{log}] {text}")
    return "\n".join(out) or "(no console output)"


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
def instance_uuid(name: str) -> str:
    """The instance id the minimal seed gives a guest started directly (stable per name)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sails-sandbox-guest:{name}"))


def seed_files(spec: GuestSpec) -> dict[str, bytes]:
    """A minimal config drive tree for a guest started without Nova: what cloud-init's
    ConfigDrive datasource needs (meta_data.json with uuid, hostname and public keys;
    network_data.json with its NIC by MAC; the ephemeral disk's name in the EC2 block device
    mapping; optional user_data)."""
    keys = [line.strip() for line in spec.authorized_keys.splitlines() if line.strip()]
    meta = {
        "uuid": instance_uuid(spec.name),
        "name": spec.hostname,
        "hostname": spec.hostname,
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": {f"key-{i}": key for i, key in enumerate(keys)},
    }
    if keys:
        meta["keys"] = [
            {"name": f"key-{i}", "type": "ssh", "data": key} for i, key in enumerate(keys)
        ]
    mapping = {"ami": "vda", "root": "/dev/vda"}
    if spec.ephemeral_gb > 0:
        mapping["ephemeral0"] = "/dev/vdb"
    network = {
        "links": [{"id": "tap0", "type": "bridge", "mtu": 1500, "ethernet_mac_address": spec.mac}],
        "networks": [
            {
                "id": "network0",
                "type": "ipv4",
                "link": "tap0",
                "ip_address": spec.ip,
                "netmask": str(ipaddress.ip_network(f"0.0.0.0/{spec.prefix}").netmask),
                "routes": [],
            }
        ],
        "services": [],
    }
    files = {
        "openstack/latest/meta_data.json": json.dumps(meta).encode(),
        "openstack/latest/network_data.json": json.dumps(network).encode(),
        "ec2/latest/meta-data.json": json.dumps({"block-device-mapping": mapping}).encode(),
    }
    if spec.user_data:
        files["openstack/latest/user_data"] = spec.user_data.encode()
    return files


def write_seed(upper: Path, files: dict[str, bytes] | Path) -> None:
    """Put a config drive tree (files by relative path, or a directory holding one) where
    cloud-init's ConfigDrive datasource reads it, in the guest's upper layer."""
    seed = upper / SEED_DIR
    shutil.rmtree(seed, ignore_errors=True)
    seed.mkdir(parents=True)
    if isinstance(files, Path):
        shutil.copytree(files, seed, dirs_exist_ok=True)
    else:
        for rel, data in files.items():
            path = seed / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise GuestError(f"bad seed path {rel!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for path in [seed, *seed.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


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


def _losetup(path: str) -> str:
    """The loop device backing ``path`` (an existing one is reused)."""
    with _loop_lock():
        found = _run("losetup", "-j", path, check=False).stdout.strip()
        if found:
            return found.split(":", 1)[0]
        return _run("losetup", "--find", "--show", path).stdout.strip()


def _devno(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _disks_file(disks: list[dict]) -> str:
    lines = []
    for disk in disks:
        if not disk.get("loop"):
            continue
        major, minor = _devno(disk["loop"])
        serial = disk["serial"][:20] if disk["serial"] != "-" else "-"
        lines.append(f"{disk['dev']} {major} {minor} {serial}")
    return "".join(line + "\n" for line in lines)


def _write_disks_file(name: str, disks: list[dict]) -> None:
    root = _dir(name) / "root"
    if _mounted(root):
        (root / "etc/sandbox-disks").write_text(_disks_file(disks))


def _plug_all(name: str) -> list[dict]:
    """Loop devices for every recorded disk, and the list the guest's boot unit reads."""
    with _guest_lock(name):
        data = _load(name)
        for disk in data["disks"]:
            try:
                disk["loop"] = _losetup(disk["path"])
            except GuestError as exc:  # e.g. the volume file is gone: the others still plug
                print(f"guest {name}: {disk['dev']} not plugged: {exc}", file=sys.stderr)
                disk["loop"] = None
        _save(name, data)
        _write_disks_file(name, data["disks"])
    return data["disks"]


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


def _launch_supervisor(name: str) -> int:
    d = _dir(name)
    log = open(d / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.guests.supervisor", str(d)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives its caller (the Nova compute process, a test)
            close_fds=True,
            cwd="/",
            env={
                **os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                "SAILS_SANDBOX_STATE": str(layout.STATE_DIR),
                "SAILS_SANDBOX_CACHE": str(layout.CACHE_DIR),
            },
        )
    finally:
        log.close()
    (d / "supervisor.pid").write_text(f"{proc.pid}\n")
    return proc.pid


# -- life cycle --------------------------------------------------------------------------------
def power_state(name: str) -> str:
    """``running`` | ``shutdown`` | ``absent``, from the live processes."""
    try:
        d = _dir(name)
    except GuestError:
        return "absent"
    if not (d / "guest.json").exists():
        return "absent"
    if _nspawn_pid(name):
        return "running"
    # between two boots of a reboot the supervisor is alive and nspawn is being relaunched
    if _supervisor_pid(name) and _power_request(name) in ("on", "reboot"):
        return "running"
    return "shutdown"


def _stopped_while_booting(name: str, down_since: list[float], grace: float = 3.0) -> bool:
    """Stopped for ``grace`` seconds in a row: a single look can fall between the supervisor's
    fork and nspawn's exec (more likely when several guests start at once)."""
    if power_state(name) == "running":
        down_since.clear()
        return False
    if not down_since:
        down_since.append(time.monotonic())
    return time.monotonic() - down_since[0] >= grace


def _systemd_running(pid: int) -> bool:
    """The guest's PID 1 has become systemd (not nspawn's child still setting up)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _wait_pid1(name: str, deadline: float, previous_pid1: int | None = None) -> int:
    """Until the guest's systemd runs as its PID 1 (a hypervisor's "the domain runs")."""
    down_since: list[float] = []
    while True:
        pid1 = _container_pid1(name)
        if pid1 and pid1 != previous_pid1 and _systemd_running(pid1):
            return pid1
        if _stopped_while_booting(name, down_since):
            raise GuestError(f"guest {name} stopped while booting: {_tail(name)}")
        if time.monotonic() > deadline:
            raise GuestError(f"guest {name} did not start within its time: {_tail(name)}")
        time.sleep(0.05)


def _failed_units(pid1: int) -> str:
    """The guest's failed units, for an error message ('' when none or unreadable)."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        out = _run(
            "nsenter", "-t", str(pid1), "-m", "-u", "-i", "-n", "-p",
            "systemctl", "--failed", "--no-legend", "--plain",
            check=False, timeout=10,
        ).stdout  # fmt: skip
        return ", ".join(line.split()[0] for line in out.splitlines() if line.strip())
    return ""


def _wait_ready(spec: GuestSpec, timeout: float, previous_pid1: int | None = None) -> None:
    """Until sshd answers on ip:22 and ``systemctl is-system-running --wait`` has settled
    (cloud-init's stages included)."""
    name = spec.name
    deadline = time.monotonic() + timeout
    pid1 = _wait_pid1(name, deadline, previous_pid1)
    down_since: list[float] = []
    while True:
        try:
            with socket.create_connection((spec.ip, 22), timeout=2) as s:
                s.settimeout(5)
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if _stopped_while_booting(name, down_since):
            raise GuestError(f"guest {name} stopped while booting: {_tail(name)}")
        if time.monotonic() > deadline:
            raise GuestError(
                f"guest {name} did not answer SSH on {spec.ip}:22 within {timeout:.0f} s "
                f"(failed units: {_failed_units(pid1) or 'none'}): {_tail(name)}"
            )
        time.sleep(0.1)
    left = max(5.0, deadline - time.monotonic())
    state = ""
    with contextlib.suppress(subprocess.TimeoutExpired):
        state = _run(
            "nsenter", "-t", str(pid1), "-m", "-u", "-i", "-n", "-p",
            "systemctl", "is-system-running", "--wait",
            check=False, timeout=left,
        ).stdout.strip()  # fmt: skip
    if state not in ("running", "degraded"):
        raise GuestError(f"guest {name} did not settle (is-system-running: {state or 'timeout'})")


def start_guest(
    spec: GuestSpec, timeout: float = 90, wait: bool = True, seed: Path | None = None
) -> None:
    """Create or power on the guest.

    ``wait=True`` (tests): return once its sshd answers and its boot has settled, cloud-init's
    first boot included. ``wait=False`` (the Nova driver): return once its systemd runs as PID 1,
    as a hypervisor reports a server ACTIVE while the guest's OS is still booting.
    ``seed``: a config drive tree (a directory, e.g. Nova's) for the first boot; without it the
    guest gets ``seed_files(spec)``. A guest that exists keeps what it was built with.

    Raises GuestError after cleaning up: a new guest is destroyed, an existing one is left
    powered off with its disk state.
    """
    if power_state(spec.name) == "running":
        return
    first_boot = not (_dir(spec.name) / "guest.json").exists()
    if first_boot and latency.get("boot"):
        time.sleep(latency.get("boot"))  # benchmarks: a cloud's build time
    net.ensure_network()
    GUESTS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        if first_boot:
            _prepare(spec, seed)
        else:
            spec = GuestSpec(**_load(spec.name)["spec"])  # the guest keeps what it was built with
        _ensure_netns(spec.name, spec)
        firewall.restore(spec.name)  # its security groups (Nova guests), before it boots
        _mount_overlay(spec.name)
        # a supervisor still winding down after a power-off must be gone before the next one
        if not _wait_gone(lambda: _supervisor_pid(spec.name), 5):
            _kill(_supervisor_pid(spec.name), signal.SIGKILL)
        _set_power(spec.name, "on")
        _launch_supervisor(spec.name)
        if wait:
            _wait_ready(spec, timeout)
        else:
            _wait_pid1(spec.name, time.monotonic() + timeout)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if first_boot:
                destroy_guest(spec.name)
            else:
                stop_guest(spec.name, timeout=10)
        if isinstance(exc, GuestError):
            raise
        if isinstance(exc, Exception):
            raise GuestError(f"guest {spec.name} did not start: {exc}") from exc
        raise


def _kill(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(check, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_guest(name: str, timeout: float = 30) -> None:
    """Power off: a clean shutdown, then a kill. The overlay and the disk records stay."""
    d = _dir(name)
    if not (d / "guest.json").exists():
        return
    _set_power(name, "off")
    # One SIGTERM reaches nspawn, which then asks the guest's systemd to power off (a second
    # one would make nspawn kill the guest at once). The supervisor passes it on.
    supervisor = _supervisor_pid(name)
    _kill(supervisor or _nspawn_pid(name), signal.SIGTERM)
    if not _wait_gone(lambda: _nspawn_pid(name), timeout):
        _kill(_container_pid1(name), signal.SIGKILL)  # ends the guest's whole pid namespace
        _kill(_nspawn_pid(name), signal.SIGKILL)
        _wait_gone(lambda: _nspawn_pid(name), 5)
    if not _wait_gone(lambda: _supervisor_pid(name), 5):
        _kill(_supervisor_pid(name), signal.SIGKILL)
        _wait_gone(lambda: _supervisor_pid(name), 2)
    (d / "nspawn.pid").unlink(missing_ok=True)


def reboot_guest(name: str, hard: bool = False, wait: bool = True) -> None:
    """Reboot a running guest (soft: systemd's reboot; hard: kill and boot again).

    A guest that is not running is powered on. Returns once it is ready again (``wait``), or
    once its systemd runs again (``wait=False``, as a hypervisor reports it).
    """
    data = _load(name) if (_dir(name) / "guest.json").exists() else None
    if data is None:
        raise GuestError(f"no guest {name}")
    spec = GuestSpec(**data["spec"])
    pid1 = _container_pid1(name)
    if power_state(name) != "running" or pid1 is None or not _supervisor_pid(name):
        stop_guest(name, timeout=10)
        start_guest(spec, wait=wait)
        return
    _set_power(name, "reboot")
    if hard:
        _kill(pid1, signal.SIGKILL)
    else:
        _kill(pid1, signal.SIGRTMIN + 5)  # systemd: start reboot.target
    if wait:
        _wait_ready(spec, 90, previous_pid1=pid1)
    else:
        _wait_pid1(name, time.monotonic() + 90, previous_pid1=pid1)


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
    names = _names(name)
    if (d / "guest.json").exists():
        with _guest_lock(name):
            data = _load(name)
            names = data["names"]
            for disk in data["disks"]:
                _detach_loops(disk["path"])
                disk["loop"] = None
            _save(name, data)
    if Path(f"/run/netns/{names['netns']}").exists():
        _run("ip", "netns", "del", names["netns"], check=False)
    _run("ip", "link", "del", names["veth"], check=False)
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{names['machine']}", ignore_errors=True)
    cgroups.remove(_tag(), name)


def _detach_loops(path: str) -> None:
    with _loop_lock():
        for line in _run("losetup", "-j", path, check=False).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0], check=False)


def destroy_guest(name: str) -> None:
    """Power off and remove everything of the guest. Volume files (Cinder's) stay."""
    d = _dir(name)
    if not d.exists():
        return
    stop_guest(name, timeout=10)
    _release(name)
    shutil.rmtree(d, ignore_errors=True)


def list_guests() -> list[str]:
    if not GUESTS_DIR.exists():
        return []
    return sorted(p.name for p in GUESTS_DIR.iterdir() if (p / "guest.json").exists())


def _our_processes() -> list[int]:
    """Supervisors and nspawn processes of this guests directory (also from a crashed run)."""
    marker = str(GUESTS_DIR) + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = _cmdline(int(entry.name))
        is_ours = (
            "sandbox.guests.supervisor" in argv or (argv and argv[0].endswith("systemd-nspawn"))
        ) and any(arg.startswith(marker) for arg in argv)
        if is_ours:
            pids.append(int(entry.name))
    return pids


def cleanup_all() -> None:
    """Stop every guest; remove every namespace, veth, overlay mount and loop device of ours.

    Guest directories (their disk state) stay, so guests can be powered on again; power_state
    then says ``shutdown``. Also clears what a crashed run left behind.
    """
    for name in list_guests():
        with contextlib.suppress(Exception):
            stop_guest(name, timeout=15)
        with contextlib.suppress(Exception):
            _release(name)
    # leftovers: processes, mounts, loop devices and namespaces with no (readable) record
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _our_processes()
        for pid in pids:
            _kill(pid, sig)
        _wait_gone(lambda: _our_processes(), 5)
    marker = str(GUESTS_DIR) + "/"
    with contextlib.suppress(OSError):
        mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mnt in reversed(mounts):
            if mnt.startswith(marker):
                _run("umount", "-l", mnt, check=False)
    with _loop_lock():
        out = _run("losetup", "-n", "-l", "-O", "NAME,BACK-FILE", check=False).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].strip().startswith(marker):
                _run("losetup", "-d", parts[0], check=False)
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(_netns_prefix()):
            _run("ip", "netns", "del", ns, check=False)
    cgroups.remove_all(_tag())


# -- volumes -----------------------------------------------------------------------------------
def _guest_sh(name: str, script: str) -> bool:
    """Run a shell script in the running guest's mount namespace; False if it is not running."""
    pid1 = _container_pid1(name)
    if pid1 is None:
        return False
    _run("nsenter", "-t", str(pid1), "-m", "--", "/bin/sh", "-c", script)
    return True


def _plug_script(dev: str, loop: str, serial: str) -> str:
    major, minor = _devno(loop)
    link = f"ln -sfn ../../{dev} /dev/disk/by-id/virtio-{serial[:20]}; " if serial != "-" else ""
    return (
        f"set -e; [ -b /dev/{dev} ] || "
        f"{{ rm -f /dev/{dev}; mknod /dev/{dev} b {major} {minor}; }}; "
        f"chmod 0660 /dev/{dev}; chgrp disk /dev/{dev} 2>/dev/null || true; "
        f"mkdir -p /dev/disk/by-id /dev/disk/by-uuid; {link}"
        f"if mountpoint -q /sys/block; then ln -sfn "
        f'"$(readlink -f /sys/dev/block/{major}:{minor})" /sys/block/{dev} || true; fi; '
        f"u=$(blkid -p -s UUID -o value /dev/{dev} 2>/dev/null || true); "
        f'[ -z "$u" ] || ln -sfn ../../{dev} "/dev/disk/by-uuid/$u"'
    )


def attach_volume(name: str, path: str, serial: str) -> str:
    """Plug a volume file into the guest as the next free /dev/vdX and return that name.

    The device also appears as /dev/disk/by-id/virtio-<serial[:20]>. The attachment is recorded,
    so every later boot plugs it again. Attaching the same serial again returns its device.
    """
    if not (_dir(name) / "guest.json").exists():
        raise GuestError(f"no guest {name}")
    with _guest_lock(name):
        data = _load(name)
        disk = next((x for x in data["disks"] if x["serial"] == serial), None)
        if disk is None:
            used = {x["dev"] for x in data["disks"]} | {"vda"}
            dev = next(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used)
            disk = {"dev": dev, "path": str(path), "serial": serial, "ephemeral": False}
            data["disks"].append(disk)
        disk["loop"] = _losetup(disk["path"])
        _save(name, data)
        _write_disks_file(name, data["disks"])
        _guest_sh(name, _plug_script(disk["dev"], disk["loop"], serial))
    return f"/dev/{disk['dev']}"


def detach_volume(name: str, serial: str) -> None:
    """Unplug the volume's node and links from the guest and free its loop device. Idempotent."""
    if not (_dir(name) / "guest.json").exists():
        return
    with _guest_lock(name):
        data = _load(name)
        gone = [x for x in data["disks"] if x["serial"] == serial and not x.get("ephemeral")]
        data["disks"] = [x for x in data["disks"] if x not in gone]
        _save(name, data)
        _write_disks_file(name, data["disks"])
        for disk in gone:
            dev = disk["dev"]
            with contextlib.suppress(GuestError):
                _guest_sh(
                    name,
                    "for l in /dev/disk/by-id/* /dev/disk/by-uuid/*; do "
                    f'[ "$(readlink "$l")" = ../../{dev} ] && rm -f "$l"; done; '
                    f"rm -f /dev/{dev}; ! mountpoint -q /sys/block || rm -f /sys/block/{dev}",
                )
            _detach_loops(disk["path"])


# -- console -----------------------------------------------------------------------------------
def console_output(name: str) -> bytes:
    """What the guest printed on its console (systemd's boot status, cloud-init's stages and its
    host key fingerprints, once per instance), as systemd-nspawn captured it in console.log:
    the last MAX_CONSOLE_BYTES of it, as Nova's libvirt driver returns it."""
    try:
        with open(_dir(name) / "console.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - MAX_CONSOLE_BYTES))
            return fh.read()
    except OSError:
        return b""
