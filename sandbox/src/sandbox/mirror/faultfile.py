"""The mirror's faults, kept in a JSON file under a lock, so any process sets them and the
server sees them at its next request."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

from sandbox import layout

FAULTS_FILE = layout.STATE_DIR / "mirror" / "faults.json"

DEFAULT_FAULTS: dict[str, Any] = {
    "fail_rate": 0.0,  # share of requests answered with fail_status
    "fail_next": 0,  # the next N requests are answered with fail_status
    "fail_status": 503,
    "delay": 0.0,  # seconds before every answer
    "repo": "signed",  # "signed" | "unsigned" (no InRelease/Release.gpg) | "tampered"
    "clients": None,  # None: every client; else only these client IPs meet the HTTP faults
    "dpkg_lock_seconds": 0.0,  # >0: guests prepared now hold the dpkg lock at first boot
    "dpkg_lock_guests": None,  # None: every guest; else only guests of these names
}
REPO_MODES = ("signed", "unsigned", "tampered")


@contextlib.contextmanager
def _faults_locked() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the faults file under a lock; yields the dict to change."""
    FAULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(FAULTS_FILE.with_name(".faults.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = faults()
            yield current
            tmp = FAULTS_FILE.with_name(f".faults.{os.getpid()}")
            tmp.write_text(json.dumps(current, indent=1) + "\n")
            tmp.replace(FAULTS_FILE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def faults() -> dict[str, Any]:
    """The faults in force (defaults for whatever was never set)."""
    try:
        stored = json.loads(FAULTS_FILE.read_text())
    except (OSError, ValueError):
        stored = {}
    return {k: stored.get(k, v) for k, v in DEFAULT_FAULTS.items()}


def set_faults(
    *,
    fail_rate: float | None = None,
    fail_next: int | None = None,
    fail_status: int | None = None,
    delay: float | None = None,
    repo: str | None = None,
    clients: list[str] | None = None,
    dpkg_lock_seconds: float | None = None,
    dpkg_lock_guests: list[str] | None = None,
) -> dict[str, Any]:
    """Change the given faults (the others stay); returns all of them.

    ``fail_rate``: share of requests answered ``fail_status`` (503); ``fail_next``: that many
    next requests are; ``delay``: seconds before every answer; ``repo``: ``unsigned`` serves no
    InRelease/Release.gpg, ``tampered`` a changed index under the original signatures;
    ``clients``: only requests from these IPs meet the HTTP faults (``[]``: every client
    again); ``dpkg_lock_seconds``: guests prepared from now on hold the dpkg lock that long at
    their first boot; ``dpkg_lock_guests``: only the guests of these names (sandbox.guests
    names; ``[]``: every guest again).
    """
    if repo is not None and repo not in REPO_MODES:
        raise ValueError(f"repo must be one of {REPO_MODES}, not {repo!r}")
    if fail_rate is not None and not 0.0 <= fail_rate <= 1.0:
        raise ValueError("fail_rate is a share between 0 and 1")
    changes = {
        "fail_rate": fail_rate,
        "fail_next": fail_next,
        "fail_status": fail_status,
        "delay": delay,
        "repo": repo,
        "dpkg_lock_seconds": dpkg_lock_seconds,
    }
    with _faults_locked() as current:
        current.update({k: v for k, v in changes.items() if v is not None})
        if clients is not None:
            current["clients"] = list(clients) or None
        if dpkg_lock_guests is not None:
            current["dpkg_lock_guests"] = list(dpkg_lock_guests) or None
    return faults()


def reset_faults() -> None:
    with _faults_locked() as current:
        current.clear()
        current.update(DEFAULT_FAULTS)


@contextlib.contextmanager
def fault(**changes: Any) -> Iterator[dict[str, Any]]:
    """``set_faults(**changes)`` for the duration of a block; the faults in force before come
    back afterwards (e.g. a test's fault scoped to its guest, in a shared sandbox)."""
    saved = faults()
    try:
        yield set_faults(**changes)
    finally:
        with _faults_locked() as current:
            current.update({k: saved[k] for k in changes})


def take_failure(client: str, rand: float) -> int | None:
    """For the server: the status to answer this request with, if a fault says it fails
    (``fail_next`` is counted down here, under the lock)."""
    current = faults()
    if current["clients"] and client not in current["clients"]:
        return None
    if current["fail_next"] > 0:
        with _faults_locked() as locked:
            if locked["fail_next"] > 0:
                locked["fail_next"] -= 1
                return int(locked["fail_status"])
    if rand < current["fail_rate"]:
        return int(current["fail_status"])
    return None
