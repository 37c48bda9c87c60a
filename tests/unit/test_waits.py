"""Every wait ends: a server that answers, but never with 200, is given up on at the bound."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from tasks.errors import BootstrapError
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
