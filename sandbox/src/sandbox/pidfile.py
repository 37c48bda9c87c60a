"""A background server known by its pid file. The pid is taken for the server only while that
process's command line still carries the server's marks: a pid reused by another process is
not it, and is never signalled."""

from __future__ import annotations

import os
import time
from pathlib import Path


def alive(pid_file: Path, *marks: bytes) -> int | None:
    """The server's pid, or None when the file is missing or its process is not the server."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if all(mark in cmdline for mark in marks) else None


def stop(pid_file: Path, *marks: bytes, wait: float = 5) -> None:
    """SIGTERM to the server, up to ``wait`` seconds for it to end; the pid file goes."""
    pid = alive(pid_file, *marks)
    if pid:
        os.kill(pid, 15)
        deadline = time.monotonic() + wait
        while alive(pid_file, *marks) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
