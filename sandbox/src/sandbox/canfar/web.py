"""HTTP plumbing shared by the stand-ins: the request handler, the TLS server, errors and routes.

A service's endpoints are a route table, one row per endpoint: ``route(method, path, handler)``,
where the path may hold ``{name}`` for one segment, passed to the handler by that name.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509

NO_CHECK_TIME = 0x200000  # OpenSSL X509_V_FLAG_NO_CHECK_TIME: expiry is judged per request


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def not_authenticated(detail: str) -> HTTPError:
    return HTTPError(401, f"NotAuthenticatedException: {detail}")


# -- HTTP plumbing ---------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "sails-sandbox"
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed

    def log_message(self, fmt: str, *args: Any) -> None:
        sys.stderr.write(f"{_iso(time.time())} {self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""  # always drained
        url = urlsplit(self.path)
        self.route_path = url.path
        self.params = parse_qsl(url.query, keep_blank_values=True)
        ctype = self.headers.get("Content-Type", "")
        if body and ctype.startswith("application/x-www-form-urlencoded"):
            self.params += parse_qsl(body, keep_blank_values=True)
        self.single = dict(self.params)
        try:
            self.server.app(self)  # type: ignore[attr-defined]
        except HTTPError as err:
            self.send(err.status, err.message + "\n", headers=err.headers)
        except Exception as exc:  # an answer, never a dropped connection
            self.send(500, f"internal error: {type(exc).__name__}: {exc}\n")

    def send(
        self,
        code: int,
        body: str | bytes,
        ctype: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, obj: Any) -> None:
        self.send(200, json.dumps(obj), "application/json")

    def peer_certificate(self) -> x509.Certificate | None:
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        return x509.load_der_x509_certificate(der) if der else None

    def certificate_user(self) -> str | None:
        """The CN of a client certificate that is valid now; 401 for an expired one."""
        cert = self.peer_certificate()
        if cert is None:
            return None
        now = dt.datetime.now(dt.UTC)
        if now > cert.not_valid_after_utc:
            raise not_authenticated(
                f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
        if now < cert.not_valid_before_utc:
            raise not_authenticated("certificate not yet valid")
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else None


class TLSServer(ThreadingHTTPServer):
    """TLS handshakes happen in the connection's own thread, so a client that connects and
    says nothing cannot stall the accept loop."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, app: Callable) -> None:  # type: ignore[type-arg]
        self.ctx, self.app = ctx, app
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(15)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            sys.stderr.write(f"{_iso(time.time())} {client_address[0]} TLS handshake: {exc}\n")
            return
        self.RequestHandlerClass(tls, client_address, self)


# -- route tables ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str  # an HTTP method, or "*" for any
    pattern: re.Pattern[str]  # matched against the whole path
    handler: Callable[..., None]


def route(method: str, path: str, handler: Callable[..., None]) -> Route:
    """A table row; ``{name}`` in ``path`` stands for one path segment (no ``/``)."""
    parts = re.split(r"\{(\w+)\}", path)
    regex = "".join(
        f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)
    )
    return Route(method, re.compile(regex), handler)


def match(routes: Sequence[Route], method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The first row for ``method`` whose pattern matches all of ``path``, with the path's parts."""
    for row in routes:
        if row.method in (method, "*"):
            found = row.pattern.fullmatch(path)
            if found:
                return row, found.groupdict()
    return None


def dispatch(routes: Sequence[Route], h: Handler, path: str, *args: Any) -> None:
    """Call the matching row's handler as ``handler(h, *args, **parts)``; no row: 404."""
    found = match(routes, h.command, path)
    if found is None:
        raise HTTPError(404, f"not found: {h.route_path}")
    row, parts = found
    row.handler(h, *args, **parts)
