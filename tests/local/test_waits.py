"""Every wait ends: a server that answers, but never with 200, is given up on at the bound."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from core.errors import BootstrapError
from tasks.prefect_server import wait_for_health


class Unhealthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unhealthy_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()


def test_health_wait_on_a_non_200_answer_ends_at_its_bound(unhealthy_url: str) -> None:
    began = time.monotonic()
    with pytest.raises(BootstrapError, match=r"within 2 s \(last answer: HTTP 503\)"):
        wait_for_health(unhealthy_url, 2)
    assert time.monotonic() - began < 10


HUNG = """
import json, socket, time
from prefect import flow, task
from flows.steps import VM_TASK

listener = socket.create_server(("127.0.0.1", 0))
attempts = []

@task(name="hung-step", **{**VM_TASK, "timeout_seconds": 2, "retry_delay_seconds": 0})
def hung_step():
    attempts.append(time.monotonic())
    with socket.create_connection(listener.getsockname()) as s:
        return s.recv(1)  # the peer accepts and never writes

@flow(name="hung")
def hung():
    return hung_step()

state = hung(return_state=True)
print(json.dumps({"failed": state.is_failed(), "message": state.message, "attempts": len(attempts)}))
"""


def test_a_step_hung_past_its_outer_bound_fails_once(prefect_server) -> None:  # type: ignore[no-untyped-def]
    """A step on the VM hung where no inner bound reaches (here a read that never gets an
    answer, as on a wedged SSH channel) fails at the outer bound and is not tried again. (Run
    as the CLI runs flows, in a process of its own: Prefect bounds a sync step with an alarm
    in the main thread, which pytest-timeout's own alarm would displace here.)"""
    import json
    import os
    import subprocess
    import sys

    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", HUNG],
        env={**os.environ, **prefect_server.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - t0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] and result["attempts"] == 1, (result, out.stderr[-2000:])
    assert "exceeded timeout of 2" in result["message"] + out.stderr, result
    assert took < 60


def test_the_outer_bound_is_past_every_bound_the_config_allows() -> None:
    from core.prefect_settings import PrefectSettings
    from core.settings import ServerSettings, SSHSettings
    from tasks.vm import STEP_BOUND

    def most(model: type, field: str) -> float:
        (le,) = [m.le for m in model.model_fields[field].metadata if hasattr(m, "le")]
        return float(le)

    inner = [
        most(ServerSettings, "apt_timeout"),
        most(ServerSettings, "boot_timeout"),
        most(SSHSettings, "connect_timeout"),
        most(PrefectSettings, "drain_timeout") + 300,  # then the health wait
    ]
    assert max(inner) < STEP_BOUND, inner
