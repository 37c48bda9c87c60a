"""The IVOA registry and CADC credential service stand-in.

Request and response shapes, with where each comes from:
- ``GET /reg/resource-caps`` → ``uri = url`` lines (canfar/auth/x509.py ``_certificate_url``).
- ``GET /cred/capabilities`` → VOSI capabilities; the ``ivo://ivoa.net/std/CDP#proxy-1.0``
  capability has a client-certificate interface and a ``ivo://ivoa.net/sso#BasicAA`` one; the
  client picks the BasicAA one (x509.py ``_certificate_url``).
- ``GET <BasicAA accessURL>?daysValid=N`` with HTTP basic auth → PEM certificate + key
  (x509.py ``gather``); a wrong password → 401 with ``WWW-Authenticate: Basic``.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from sandbox import ca, layout
from sandbox.canfar.skaha import skaha_origin
from sandbox.canfar.store import settings
from sandbox.canfar.vosi import BASIC_AA, TLS_CERT, _availability, _capabilities
from sandbox.canfar.web import Handler, HTTPError, not_authenticated

CDP_PATH = "/cred/priv"  # BasicAA: username + password → proxy certificate
CDP_CERT_PATH = "/cred/priv/cert"  # a still-valid client certificate → a fresh one


def cred_origin() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.CRED_PORT}"


def cred(h: Handler) -> None:
    path = h.route_path.rstrip("/")
    origin = cred_origin()
    if path == "/reg/resource-caps":
        return h.send(
            200,
            "# sails sandbox registry: resource identifier = capabilities URL\n"
            f"ivo://cadc.nrc.ca/cred = {origin}/cred/capabilities\n"
            f"ivo://cadc.nrc.ca/skaha = {skaha_origin()}/skaha/capabilities\n",
        )
    if path == "/cred/availability":
        return h.send(200, _availability("cred (sails sandbox) is accepting requests"), "text/xml")
    if path == "/cred/capabilities":
        doc = _capabilities(
            origin,
            [
                ("ivo://ivoa.net/std/VOSI#capabilities", [(f"{origin}{path}", "full", [])]),
                ("ivo://ivoa.net/std/VOSI#availability",
                 [(f"{origin}/cred/availability", "full", [])]),
                ("ivo://ivoa.net/std/CDP#proxy-1.0",
                 [(f"{origin}{CDP_CERT_PATH}", "base", [TLS_CERT]),
                  (f"{origin}{CDP_PATH}", "base", [BASIC_AA])]),
            ],
        )  # fmt: skip
        return h.send(200, doc, "text/xml")
    if path in (CDP_PATH, CDP_CERT_PATH) and h.command == "GET":
        s = settings()
        user = _basic_user(h, s) if path == CDP_PATH else h.certificate_user()
        if user is None:
            raise not_authenticated("a client certificate is required")
        raw = h.single.get("daysValid", "30")
        try:
            days = float(raw)
        except ValueError:
            raise HTTPError(400, f"invalid daysValid: {raw}") from None
        if days <= 0:
            raise HTTPError(400, f"invalid daysValid: {raw}")
        seconds = s["validity_seconds"] or min(days, float(s["max_days_valid"])) * 86400
        pem = ca.proxy_certificate(user, seconds=float(seconds))
        return h.send(200, pem, "application/x-pem-file")
    raise HTTPError(404, f"not found: {h.route_path}")


def _basic_user(h: Handler, s: dict[str, Any]) -> str:
    challenge = {"WWW-Authenticate": 'Basic realm="CADC"'}
    auth = h.headers.get("Authorization", "")
    if not auth.lower().startswith("basic "):
        raise HTTPError(401, "NotAuthenticatedException: login required", challenge)
    try:
        user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
    except ValueError:
        raise HTTPError(400, "malformed Authorization header") from None
    known = s["users"].get(user)
    if known is None or not secrets.compare_digest(known, password):
        raise HTTPError(401, "NotAuthenticatedException: invalid username or password", challenge)
    return user
