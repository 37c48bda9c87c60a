"""Waiting for the sandbox cloud: polling a check until a deadline, and the checks it polls
most (a TCP port that accepts, an HTTP(S) endpoint that answers)."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable

from sandbox.cloud import common as c


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"sandbox cloud: {what} not ready after {timeout:.0f} s")
        time.sleep(interval)


def port_open(port: int, host: str = c.HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_answers(port: int, path: str = "/", *, tls: bool = False) -> bool:
    """The port answers an HTTP GET below 500; with ``tls``, over HTTPS verified with the
    sandbox CA (the public endpoints speak nothing else)."""
    conn: http.client.HTTPConnection
    if tls:
        import ssl

        from sandbox import ca

        context = ssl.create_default_context(cafile=str(ca.ca_cert_path()))
        conn = http.client.HTTPSConnection(c.HOST, port, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection(c.HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status < 500
    finally:
        conn.close()
