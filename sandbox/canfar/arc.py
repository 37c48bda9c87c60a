"""The /arc host: a real OpenSSH server, SFTP only, chrooted to an /arc-like tree, key-only.

It stands in for ws-uv.canfar.net:64022. Tests stop, restart and freeze it (SIGSTOP on the
listener and every session process) to make stale and hung sshfs mounts.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from sandbox import layout

ARC_DIR = layout.STATE_DIR / "canfar" / "arc"
ROOT = ARC_DIR / "root"  # the chroot: home/<user>, projects/<project>
KEYS = ARC_DIR / "keys"  # authorized keys per user, outside the chroot
CONFIG = ARC_DIR / "sshd_config"
PID_FILE = ARC_DIR / "sshd.pid"
LOG_FILE = layout.STATE_DIR / "logs" / "arc-sshd.log"
PROJECT = "ALMA-SAILS"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        # '*' (not '!'): with UsePAM no, a locked account is refused even with a key.
        _run("useradd", "-M", "-d", f"/home/{user}", "-s", "/usr/sbin/nologin", "-p", "*", user)


def prepare(user: str) -> None:
    """The chroot tree (every component root-owned, not group/world-writable), keys, config."""
    ensure_user(user)
    pw = pwd.getpwnam(user)
    for d in (
        layout.STATE_DIR,
        layout.STATE_DIR / "canfar",
        ARC_DIR,
        ROOT,
        ROOT / "home",
        ROOT / "projects",
    ):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    for d in (ROOT / "home" / user, ROOT / "projects" / PROJECT):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o755)
    KEYS.mkdir(parents=True, exist_ok=True)
    os.chmod(KEYS, 0o755)
    keyfile = KEYS / user
    if not keyfile.exists():
        keyfile.write_text("")
    os.chmod(keyfile, 0o644)
    for kind in ("ed25519", "rsa"):
        hk = ARC_DIR / f"ssh_host_{kind}_key"
        if not hk.exists():
            _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(hk))
    CONFIG.write_text(
        f"ListenAddress {layout.SERVICES_IP}:{layout.ARC_PORT}\n"
        f"HostKey {ARC_DIR / 'ssh_host_ed25519_key'}\n"
        f"HostKey {ARC_DIR / 'ssh_host_rsa_key'}\n"
        f"PidFile {PID_FILE}\n"
        f"AuthorizedKeysFile {KEYS}/%u\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n"
        "UsePAM no\nUseDNS no\nX11Forwarding no\nAllowTcpForwarding no\n"
        f"AllowUsers {user}\n"
        "Subsystem sftp internal-sftp\n"
        f"ChrootDirectory {ROOT}\n"
        "ForceCommand internal-sftp -d /home/%u\n"
    )


def add_key(user: str, public_key: str) -> None:
    keyfile = KEYS / user
    lines = keyfile.read_text().splitlines() if keyfile.exists() else []
    key = public_key.strip()
    if key.split()[:2] not in [line.split()[:2] for line in lines]:
        lines.append(key)
        keyfile.write_text("\n".join(lines) + "\n")
    os.chmod(keyfile, 0o644)


def listener_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _all_pids() -> list[int]:
    pid = listener_pid()
    return _descendants(pid) if pid else []


def start() -> None:
    if listener_pid():
        return
    os.makedirs("/run/sshd", exist_ok=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    _run("/usr/sbin/sshd", "-f", str(CONFIG), "-E", str(LOG_FILE))
    deadline = time.monotonic() + 10
    while not listener_pid():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the /arc sshd did not start; see {LOG_FILE}")
        time.sleep(0.05)


def stop() -> None:
    """Kill the listener and every session (clients see the connection drop)."""
    pids = _all_pids()
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    PID_FILE.unlink(missing_ok=True)


def restart() -> None:
    stop()
    time.sleep(0.2)
    start()


def freeze() -> None:
    """SIGSTOP the listener and every session: TCP stays up, nothing answers."""
    for pid in _all_pids():
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def thaw() -> None:
    for pid in _all_pids():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def running() -> bool:
    return listener_pid() is not None
