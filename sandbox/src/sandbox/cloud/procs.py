"""Long-running processes of the sandbox: started detached, tracked by pid files, stopped by group.

Each process runs in its own session (so its workers and helpers form one process group) with
stdout/stderr appended to STATE_DIR/logs/<name>.log and its pid in STATE_DIR/run/<name>.pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from sandbox.cloud import common as c

_children: dict[str, subprocess.Popen[bytes]] = {}


def pid_file(name: str) -> Path:
    return c.RUN / f"{name}.pid"


def log_file(name: str) -> Path:
    return c.LOGS / f"{name}.log"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_of(name: str) -> int | None:
    try:
        pid = int(pid_file(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def running(name: str) -> bool:
    return pid_of(name) is not None


def start(
    name: str,
    argv: list[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` detached unless ``name`` already runs; return its pid."""
    pid = pid_of(name)
    if pid is not None:
        return pid
    c.LOGS.mkdir(parents=True, exist_ok=True)
    c.RUN.mkdir(parents=True, exist_ok=True)
    with log_file(name).open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    _children[name] = proc
    pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            return True
    return False


def _reap() -> None:
    for name, proc in list(_children.items()):
        if proc.poll() is not None:
            _children.pop(name, None)


def stop(names: Iterable[str], timeout: float = 15.0) -> None:
    """TERM every named process group, wait up to ``timeout``, then KILL what is left."""
    pids = {}
    for name in names:
        pid = pid_of(name)
        if pid is not None:
            pids[name] = pid
            _signal_group(pid, signal.SIGTERM)
        else:
            pid_file(name).unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        _reap()
        pids = {n: p for n, p in pids.items() if _group_alive(p)}
        if pids:
            time.sleep(0.2)
    for pid in pids.values():
        _signal_group(pid, signal.SIGKILL)
    if pids:
        time.sleep(0.3)
    _reap()
    for name in names:
        if pid_of(name) is None:
            pid_file(name).unlink(missing_ok=True)


def known() -> list[str]:
    if not c.RUN.is_dir():
        return []
    return sorted(p.stem for p in c.RUN.glob("*.pid"))
