"""The stand-ins' settings (users, tokens, images, fault injection) and where their state lives.

The control side (``sandbox.canfar``) writes the settings file; the services re-read it on every
request, under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

from sandbox import layout

DATA = layout.STATE_DIR / "canfar"
SETTINGS = DATA / "settings.json"
SESSIONS = DATA / "sessions"

DEFAULT_SETTINGS: dict[str, Any] = {
    "users": {},  # name -> password (credential service)
    "tokens": {},  # bearer token -> user name (session API)
    "images": [
        {"id": "images.canfar.net/skaha/astroml:latest", "types": ["notebook", "headless"]},
        {"id": "images.canfar.net/skaha/terminal:1.1.1", "types": ["headless"]},
        {"id": "images.canfar.net/casa/casa:6.6", "types": ["headless", "desktop-app"]},
    ],
    "harbor_hosts": ["images.canfar.net"],
    "max_days_valid": 30,  # cap on daysValid, as CADC caps it
    "validity_seconds": None,  # overrides daysValid (tests: certificates that expire soon)
    "start_delay": 1.0,  # seconds a new session stays Pending
    "time_limit": 600,  # seconds a headless session may run (its expiry)
    "fail_next_creates": 0,  # the next N session creations fail ...
    "fail_status": 503,  # ... with this status
    "core_options": list(range(1, 17)),
    "ram_options": [1, 2, 4, 8, 16, 32, 64],
    "gpu_options": [],
}


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "settings.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _read() -> dict[str, Any]:
    data = dict(DEFAULT_SETTINGS)
    with contextlib.suppress(OSError, ValueError):
        data.update(json.loads(SETTINGS.read_text()))
    data["images"] = [i if isinstance(i, dict) else {"id": i, "types": ["headless"]} for i in
                      data["images"]]  # fmt: skip
    return data


def _write(data: dict[str, Any]) -> None:
    tmp = SETTINGS.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    tmp.replace(SETTINGS)


def settings() -> dict[str, Any]:
    with _locked():
        return _read()


def update_settings(**changes: Any) -> dict[str, Any]:
    unknown = set(changes) - set(DEFAULT_SETTINGS)
    if unknown:
        raise KeyError(f"unknown settings: {sorted(unknown)}")
    with _locked():
        data = _read()
        data.update(changes)
        _write(data)
        return data


def _take_injected_failure() -> int | None:
    """Consume one injected create failure; its HTTP status, or None."""
    with _locked():
        data = _read()
        if data["fail_next_creates"] <= 0:
            return None
        data["fail_next_creates"] -= 1
        _write(data)
        return int(data["fail_status"])
