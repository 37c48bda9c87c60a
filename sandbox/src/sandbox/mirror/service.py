"""The mirror's server process (``sandbox.mirror.server``): start, stop, health and status."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from sandbox import layout, net, pidfile
from sandbox.mirror.common import (
    COMPONENT,
    HEALTH_PATH,
    LOG_FILE,
    PID_FILE,
    SOURCE_DIR,
    _lock,
    _log,
    build_dir,
    repo_dir,
    url,
)
from sandbox.mirror.faultfile import DEFAULT_FAULTS, FAULTS_FILE, faults
from sandbox.mirror.repository import build, ready

#: What the mirror server's command line carries.
SERVER_MARK = b"sandbox.mirror.server"


def _alive() -> int | None:
    """The mirror's server process (checked by its command line, not just the pid)."""
    return pidfile.alive(PID_FILE, SERVER_MARK)


def _health() -> str | None:
    """The document root the running server reports, or None when nothing answers."""
    health = f"http://{layout.SERVICES_IP}:{layout.MIRROR_PORT}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(health, timeout=2) as r:
            return r.read().decode().strip() if r.status == 200 else None
    except OSError:
        return None


def running() -> bool:
    return _health() is not None


def up() -> str:
    """Serve the mirror on the tenant gateway (idempotent, quick when it already serves the
    current build); returns its URL."""
    served = build_dir() if ready() else build(log=_log)
    if _alive() and _health() == str(served):
        return url()
    with _lock(".up.lock"):  # one starter at a time (the sandbox's up(), a test fixture)
        if not (_alive() and _health() == str(served)):
            _start(served)
    return url()


def _start(served: Path) -> None:
    net.ensure_network()
    down()
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    FAULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sandbox.mirror.server", str(served),
                layout.SERVICES_IP, str(layout.MIRROR_PORT),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(SOURCE_DIR.parents[1]),
            env={**os.environ, "SAILS_SANDBOX_STATE": str(layout.STATE_DIR),
                 "SAILS_SANDBOX_CACHE": str(layout.CACHE_DIR)},
        )  # fmt: skip
    PID_FILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while _health() != str(served):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the package mirror did not start; see {LOG_FILE}")
        time.sleep(0.1)


def down() -> None:
    pidfile.stop(PID_FILE, SERVER_MARK)


def status() -> dict[str, Any]:
    current = faults()
    return {
        "url": url(),
        "running": running(),
        "packages": len(list((repo_dir() / "pool" / COMPONENT).glob("*.deb"))),
        "faults": {k: v for k, v in current.items() if v != DEFAULT_FAULTS[k]},
    }
