"""One run at a time per environment on this machine: a file lock the changing commands hold.

A second `up` (or provision, configure, register, remount, reauth, down) of the same environment
waits for the first with a message, up to a bound, and then refuses naming the run that holds
it; it never runs beside it. The lock is the kernel's (flock): a killed run releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: Seconds a second run waits for the first (0: refuse at once).
WAIT_ENV = "SAILS_BOOTSTRAP_LOCK_WAIT"
DEFAULT_WAIT = 3600.0


class LockHeld(RuntimeError):
    """Another run of the same environment held the lock past the wait."""


def lock_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sails-bootstrap"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 400).decode(errors="replace").strip() or "a run that wrote nothing yet"


@contextlib.contextmanager
def environment_lock(
    environment: str,
    command: str,
    *,
    wait: float | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Iterator[Path]:
    """Hold the environment's lock for the body; wait for another holder up to ``wait`` s."""
    if wait is None:
        wait = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT))
    path = lock_dir() / f"{environment}.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        began = time.monotonic()
        told = -1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - began
                holder = _holder(fd)
                if waited >= wait:
                    raise LockHeld(
                        f"environment {environment!r} is in use by another sails-bootstrap run "
                        f"({holder}; lock {path}). Wait for it to end, or stop it; a killed run "
                        f"frees the lock ({WAIT_ENV}={wait:.0f} s of waiting were spent)"
                    ) from None
                if told < 0 or waited - told >= 30:
                    say(
                        f"waiting for another run of {environment!r} to end ({holder}; "
                        f"{waited:.0f} s of up to {wait:.0f} s)"
                    )
                    told = waited
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `{command}` since {time.ctime()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock
