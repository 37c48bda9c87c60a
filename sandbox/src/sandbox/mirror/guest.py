"""The guest side: what a guest gets before its first boot (the mirror's source and key, and
the unit that holds the dpkg lock while that fault is set)."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.mirror.common import COMPONENT, SUITE, url
from sandbox.mirror.faultfile import faults
from sandbox.mirror.signing import ensure_key

#: What a guest gets (paths inside the guest).
GUEST_SOURCES = "etc/apt/sources.list.d/sandbox.sources"
GUEST_KEYRING = "etc/apt/keyrings/sails-sandbox.gpg"
LOCK_UNIT = "sails-sandbox-dpkg-lock.service"
LOCK_MARKER = "/var/lib/sails-sandbox/dpkg-lock-held"


def sources_text() -> str:
    """The deb822 source a guest gets (``Signed-By``: no ``trusted=yes``)."""
    return (
        "Types: deb\n"
        f"URIs: {url()}\n"
        f"Suites: {SUITE}\n"
        f"Components: {COMPONENT}\n"
        f"Signed-By: /{GUEST_KEYRING}\n"
    )


def _mkdirs(upper: Path, rel: str) -> Path:
    """Directories of the overlay's upper layer, root-owned 0755 as in the image."""
    path = upper
    for part in Path(rel).parts:
        path = path / part
        if not path.exists():
            path.mkdir()
            os.chmod(path, 0o755)
    return path


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def lock_unit(seconds: float) -> str:
    """A unit that, at the first boot, holds /var/lib/dpkg/lock-frontend and /var/lib/dpkg/lock
    for ``seconds`` as apt, dpkg and unattended-upgrades hold them: fcntl (POSIX) write locks,
    so apt reports "Could not get lock" and ``-o DPkg::Lock::Timeout=N`` waits. It tells systemd
    it is ready once both are held, before sshd starts."""
    script = "; ".join(
        [
            "import fcntl, os, socket, sys, time",
            "os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)",
            "open(sys.argv[2], 'w').close()",
            "fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o640) for p in "
            "('/var/lib/dpkg/lock-frontend', '/var/lib/dpkg/lock')]",
            "[fcntl.lockf(fd, fcntl.LOCK_EX) for fd in fds]",
            "a = os.environ['NOTIFY_SOCKET']",
            "a = chr(0) + a[1:] if a.startswith('@') else a",
            "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', a)",
            "time.sleep(float(sys.argv[1]))",
        ]
    )
    return (
        "[Unit]\n"
        "Description=Package manager busy at first boot (sandbox fault: dpkg lock held)\n"
        f"ConditionPathExists=!{LOCK_MARKER}\n"
        "Before=ssh.service\n"
        "\n[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f'ExecStart=/usr/bin/python3 -c "{script}" {seconds:g} {LOCK_MARKER}\n'
        "TimeoutStartSec=60\n"
        "\n[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def prepare_guest(upper: Path) -> None:
    """Before a guest's first boot, in its overlay's upper layer: the mirror's deb822 source
    and its signing key; and, while the ``dpkg_lock_seconds`` fault is set, the unit that holds
    the dpkg lock at this first boot. Package lists stay empty, as on a fresh VM.

    ``upper`` is ``<guests dir>/<guest name>/upper``: the name is what ``dpkg_lock_guests``
    matches."""
    keyring = ensure_key()
    _write(_mkdirs(upper, "etc/apt/sources.list.d") / Path(GUEST_SOURCES).name, sources_text())
    _write(_mkdirs(upper, "etc/apt/keyrings") / Path(GUEST_KEYRING).name, keyring.read_bytes())
    current = faults()
    seconds = float(current["dpkg_lock_seconds"] or 0)
    only = current["dpkg_lock_guests"]
    if seconds > 0 and (not only or upper.parent.name in only):
        units = _mkdirs(upper, "etc/systemd/system")
        _write(units / LOCK_UNIT, lock_unit(seconds))
        wants = _mkdirs(upper, "etc/systemd/system/multi-user.target.wants")
        link = wants / LOCK_UNIT
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{LOCK_UNIT}")
