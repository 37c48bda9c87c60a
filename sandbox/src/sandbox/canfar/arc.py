"""The /arc host: a real OpenSSH server, SFTP only, chrooted to an /arc-like tree, key-only.

It stands in for ws-uv.canfar.net:64022. The tree is ``home/<user>`` and
``projects/<project>``. Its own host keys, config and pid file live under STATE_DIR; Debian's
own sshd (if any) is left alone. Tests stop, restart and freeze it (SIGSTOP on the listener and
every session process) to make stale and hung sshfs mounts.

sshd's rules that shape this: every component of ChrootDirectory must be root-owned and not
group/world-writable; with ``UsePAM no`` an account whose password field is ``!`` counts as
locked and is refused even with a key, so users are created with ``-p '*'``.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
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
SSHD = "/usr/sbin/sshd"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def ensure_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        # '*' (not '!'): with UsePAM no, a locked account is refused even with a key.
        _run("useradd", "-M", "-d", f"/home/{user}", "-s", "/usr/sbin/nologin", "-p", "*", user)
        return pwd.getpwnam(user)


def _root_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, 0, 0)
    os.chmod(d, 0o755)


def _check_chroot_path() -> None:
    for d in [ROOT, *ROOT.parents]:
        st = d.stat()
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(
                f"sshd refuses ChrootDirectory {ROOT}: {d} must be root-owned and not "
                "group/world-writable (set SAILS_SANDBOX_STATE elsewhere)"
            )


def prepare_user(user: str) -> None:
    """A local account (uid for file ownership), its home in the tree and its key file."""
    pw = ensure_user(user)
    for d in (ROOT / "home", ROOT / "projects"):
        _root_dir(d)
    home = ROOT / "home" / user
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o750)
    project = ROOT / "projects" / PROJECT
    if not project.exists():  # the first user owns the project directory
        project.mkdir(parents=True)
        os.chown(project, pw.pw_uid, pw.pw_gid)
        os.chmod(project, 0o775)
    _root_dir(KEYS)
    keyfile = KEYS / user
    if not keyfile.exists():
        keyfile.write_text("")
    os.chown(keyfile, 0, 0)
    os.chmod(keyfile, 0o644)


def write_file(user: str, relpath: str, text: str) -> Path:
    """A file in the tree, owned by ``user`` like everything the user makes there."""
    pw = ensure_user(user)
    target = (ROOT / relpath.lstrip("/")).resolve()
    if ROOT.resolve() not in target.parents:
        raise ValueError(f"{relpath!r} is outside /arc")
    missing = [d for d in [target.parent, *target.parent.parents] if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    for d in missing:
        os.chown(d, pw.pw_uid, pw.pw_gid)
    target.write_text(text)
    os.chown(target, pw.pw_uid, pw.pw_gid)
    return target


def users() -> list[str]:
    return sorted(p.name for p in KEYS.iterdir()) if KEYS.exists() else []


def prepare() -> None:
    """The chroot tree, host keys and the config (for every user ``prepare_user`` made)."""
    for d in (layout.STATE_DIR, layout.STATE_DIR / "canfar", ARC_DIR, ROOT):
        _root_dir(d)
    _check_chroot_path()
    for kind in ("ed25519", "rsa"):
        hk = ARC_DIR / f"ssh_host_{kind}_key"
        if not hk.exists():
            _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "arc-sandbox", "-f", str(hk))
    allowed = " ".join(users()) or "nobody-allowed"
    CONFIG.write_text(
        f"ListenAddress {layout.SERVICES_IP}:{layout.ARC_PORT}\n"
        f"HostKey {ARC_DIR / 'ssh_host_ed25519_key'}\n"
        f"HostKey {ARC_DIR / 'ssh_host_rsa_key'}\n"
        f"PidFile {PID_FILE}\n"
        f"AuthorizedKeysFile {KEYS}/%u\n"
        "AuthenticationMethods publickey\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin no\nUsePAM no\nUseDNS no\n"
        "X11Forwarding no\nAllowTcpForwarding no\nAllowAgentForwarding no\nPermitTunnel no\n"
        "PermitTTY no\nPrintMotd no\nLogLevel VERBOSE\n"
        "ClientAliveInterval 0\nMaxStartups 50:30:200\n"
        f"AllowUsers {allowed}\n"
        "Subsystem sftp internal-sftp\n"
        f"ChrootDirectory {ROOT}\n"
        "ForceCommand internal-sftp -d /home/%u\n"
    )
    # sshd's privilege-separation directory: `sshd -t` refuses the config without it, and a
    # machine with no systemd never has it made at boot.
    os.makedirs("/run/sshd", exist_ok=True)
    _run(SSHD, "-t", "-f", str(CONFIG))


def add_key(user: str, public_key: str) -> None:
    """Append an OpenSSH public key line to ``user``'s authorized keys (idempotent)."""
    key = public_key.strip()
    if len(key.split()) < 2 or "\n" in key:
        raise ValueError("expected one OpenSSH public key line ('type base64 [comment]')")
    if not (KEYS / user).exists():
        prepare_user(user)
        if listener_pid():
            prepare()
            reload()
    keyfile = KEYS / user
    lines = [line for line in keyfile.read_text().splitlines() if line.strip()]
    if key.split()[:2] not in [line.split()[:2] for line in lines]:
        lines.append(key)
        keyfile.write_text("\n".join(lines) + "\n")
    os.chmod(keyfile, 0o644)


def host_key_lines() -> list[str]:
    """The host's public keys ('type base64'), e.g. for a known_hosts entry."""
    out = []
    for kind in ("ed25519", "rsa"):
        pub = ARC_DIR / f"ssh_host_{kind}_key.pub"
        if pub.exists():
            out.append(" ".join(pub.read_text().split()[:2]))
    return out


def listener_pid() -> int | None:
    """The listening sshd of this host (not Debian's or another one's)."""
    try:
        pid = int(PID_FILE.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # sshd rewrites its title
    except (OSError, ValueError):
        return None
    return pid if str(CONFIG).encode() in cmdline else None


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _all_pids() -> list[int]:
    """The listener and every process under it (per-connection sshd, sftp sessions)."""
    pid = listener_pid()
    if not pid:
        return []
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def start() -> None:
    if listener_pid():
        return
    os.makedirs("/run/sshd", exist_ok=True)  # /run may have been emptied since prepare()
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    PID_FILE.unlink(missing_ok=True)
    _run(SSHD, "-f", str(CONFIG), "-E", str(LOG_FILE))
    deadline = time.monotonic() + 10
    while not listener_pid():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the /arc sshd did not start; see {LOG_FILE}")
        time.sleep(0.05)


def reload() -> None:
    pid = listener_pid()
    if pid:
        os.kill(pid, signal.SIGHUP)  # sshd re-execs itself with the new config
        time.sleep(0.3)


def stop() -> None:
    """Kill the listener and every session (clients see their connections drop)."""
    pids = _all_pids()
    _signal(pids, signal.SIGKILL)
    _signal(pids, signal.SIGCONT)  # a frozen process dies only once it runs again
    PID_FILE.unlink(missing_ok=True)


def restart() -> None:
    stop()
    time.sleep(0.2)
    start()


def freeze() -> None:
    """SIGSTOP the listener and every session: TCP stays up, nothing answers."""
    _signal(_all_pids(), signal.SIGSTOP)


def thaw() -> None:
    _signal(_all_pids(), signal.SIGCONT)


def frozen() -> bool:
    pid = listener_pid()
    if not pid:
        return False
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "T"
    except OSError:
        return False


def running() -> bool:
    return listener_pid() is not None
