"""A real Prefect server on loopback (SQLite, its own home), for the tests and the bench.

It runs the Prefect of the calling interpreter (``python -m prefect server start``), so the
caller's client and the server speak the same version; Prefect must be installed there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrefectServer:
    url: str  # .../api
    home: Path
    log: Path
    process: subprocess.Popen[bytes]
    auth_string: str | None = None

    def env(self) -> dict[str, str]:
        env = {"PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.home)}
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        return env


def start_prefect_server(home: Path, *, auth_string: str | None = None) -> PrefectServer:
    """Start ``prefect server start`` on a free loopback port and wait for /api/health."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    env.pop("PREFECT_API_URL", None)
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    log = home / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--no-ui"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return PrefectServer(url, home, log, proc, auth_string)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("prefect server did not answer /api/health within 120 s")


def stop_prefect_server(server: PrefectServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextmanager
def serving_prefect(home: Path) -> Iterator[PrefectServer]:
    """A real Prefect server, with this process's client pointed at it inside the block
    (Prefect reads its settings at import: setting the environment now would be too late)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = start_prefect_server(home)
    try:
        with temporary_settings({PREFECT_API_URL: server.url}):
            try:
                yield server
            finally:
                drain_prefect_workers()
    finally:
        stop_prefect_server(server)


def drain_prefect_workers(timeout: float = 30) -> None:
    """Send this process's queued logs and events while their server still answers. Left for
    interpreter exit, they would go to an ephemeral server started for them (the API URL is
    unset by then), and the exit would wait on that."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)
