"""HTTPS stand-ins for CANFAR's Skaha session API and CADC's registry + credential service.

Each service is a module of its own: ``skaha`` (the session API, its sessions in ``headless``)
and ``cred`` (the registry and the credential service), on the HTTP plumbing of ``web`` with
the VOSI documents of ``vosi``; ``store`` holds the settings both re-read on every request.
This module starts one of them and re-exports the public names of each.

Run as ``python -m sandbox.canfar.services skaha|cred`` (``sandbox.canfar.up`` starts them).
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import time
from typing import Any

from sandbox import ca, layout
from sandbox.canfar.cred import CDP_CERT_PATH, CDP_PATH, cred, cred_origin
from sandbox.canfar.headless import NONE, Sessions, live_sessions, public
from sandbox.canfar.skaha import SKAHA_BASE, SKAHA_BASES, skaha, skaha_origin
from sandbox.canfar.store import (
    DATA,
    DEFAULT_SETTINGS,
    SESSIONS,
    SETTINGS,
    settings,
    update_settings,
)
from sandbox.canfar.vosi import BASIC_AA, COOKIE, TLS_CERT, TOKEN, VOSI_CAPS, VS, XSI
from sandbox.canfar.web import NO_CHECK_TIME, Handler, HTTPError, TLSServer, _iso, not_authenticated

__all__ = [
    "BASIC_AA",
    "CDP_CERT_PATH",
    "CDP_PATH",
    "COOKIE",
    "DATA",
    "DEFAULT_SETTINGS",
    "NONE",
    "NO_CHECK_TIME",
    "SESSIONS",
    "SETTINGS",
    "SKAHA_BASE",
    "SKAHA_BASES",
    "TLS_CERT",
    "TOKEN",
    "VOSI_CAPS",
    "VS",
    "XSI",
    "HTTPError",
    "Handler",
    "Sessions",
    "TLSServer",
    "cred",
    "cred_origin",
    "live_sessions",
    "not_authenticated",
    "public",
    "serve",
    "settings",
    "skaha",
    "skaha_origin",
    "update_settings",
]


def serve(kind: str) -> None:
    port = layout.SKAHA_PORT if kind == "skaha" else layout.CRED_PORT
    cert, key = ca.server_certificate(layout.SERVICES_IP)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca.ca_cert_path()))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # certificate or token/password, both allowed
    ctx.verify_flags |= NO_CHECK_TIME  # an expired certificate gets an HTTP 401, not a TLS alert
    if kind == "skaha":
        sessions = Sessions()
        server = TLSServer((layout.SERVICES_IP, port), ctx, lambda h: skaha(h, sessions))
    else:
        sessions = None
        server = TLSServer((layout.SERVICES_IP, port), ctx, cred)

    def stop(signum: int, frame: Any) -> None:
        if sessions is not None:
            sessions.kill_all()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"{_iso(time.time())} {kind} listening on {layout.SERVICES_IP}:{port}\n")
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1])
