"""The fault proxy on loopback, in front of a plain HTTP server (no root, no cloud): it forwards,
counts each request by service, path and client, and injects the faults its rules name."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.faults import FaultControl, server_argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[str, FaultControl]]:
    (tmp_path / "hello.txt").write_text("hello")
    upstream, listen, ctl = _free_port(), _free_port(), _free_port()
    origin = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(upstream), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        server_argv(sys.executable, {"files": (listen, upstream)}, ctl),
        stdout=subprocess.DEVNULL,
    )
    try:
        control = FaultControl(f"http://127.0.0.1:{ctl}")
        control.wait_ready()
        yield f"http://127.0.0.1:{listen}", control
    finally:
        for p in (proxy, origin):
            p.kill()
            p.wait()


def _get(url: str, agent: str = "t-agent/1.0") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": agent})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_forwards_and_counts_by_path_and_client(proxied: tuple[str, FaultControl]) -> None:
    url, control = proxied
    assert _get(f"{url}/hello.txt?x=1") == (200, b"hello")
    counts = control.counts()
    assert counts["paths"]["files"] == {"GET /hello.txt": 1}  # the query is not the path's
    assert counts["agents"]["t-agent/1.0"]["files"] == {"GET /hello.txt": 1}
    assert control.writes() == 0


def test_the_next_request_gets_the_named_fault_then_it_stops(
    proxied: tuple[str, FaultControl],
) -> None:
    url, control = proxied
    control.configure("files", fail_next=1, faults=["503"], retry_after=1)
    status, _ = _get(f"{url}/hello.txt")
    assert status == 503
    assert _get(f"{url}/hello.txt") == (200, b"hello")
    assert control.counts()["faults"]["files"] == {"503": 1}
