"""A guest's record and its live state: names, the record file, processes, power and console.

Everything here reads ``sandbox.guests.GUESTS_DIR`` at each call (``guests_dir()``): the
supervisor and the tests set it on the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import locks

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


def guests_dir() -> Path:
    """``sandbox.guests.GUESTS_DIR``, read at each call (the supervisor and the tests set it)."""
    from sandbox import guests

    return guests.GUESTS_DIR


# -- small helpers -----------------------------------------------------------------------------
def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    p = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise GuestError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _dir(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise GuestError(f"bad guest name {name!r}")
    return guests_dir() / name


def _tag() -> str:
    """Short hash of the guests directory: namespaces of another state directory are not ours."""
    return hashlib.sha1(str(guests_dir()).encode()).hexdigest()[:4]


def _netns_prefix() -> str:
    return f"sails-{_tag()}-"


def _names(name: str) -> dict[str, str]:
    """Namespace and interface names for a guest (interfaces: IFNAMSIZ is 15 with the NUL)."""
    h = hashlib.sha1(f"{guests_dir()}/{name}".encode()).hexdigest()[:10]
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
    return locks.flock(guests_dir() / ".loop.lock")


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


# -- power state -------------------------------------------------------------------------------
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


def list_guests() -> list[str]:
    if not guests_dir().exists():
        return []
    return sorted(p.name for p in guests_dir().iterdir() if (p / "guest.json").exists())


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
