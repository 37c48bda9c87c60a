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
from sandbox.canfar.web import Handler, HTTPError, dispatch, not_authenticated, route

CDP_PATH = "/cred/priv"  # BasicAA: username + password → proxy certificate
CDP_CERT_PATH = "/cred/priv/cert"  # a still-valid client certificate → a fresh one


def cred_origin() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.CRED_PORT}"


def cred(h: Handler) -> None:
    dispatch(ROUTES, h, h.route_path.rstrip("/"))


def _resource_caps(h: Handler) -> None:
    h.send(
        200,
        "# sails sandbox registry: resource identifier = capabilities URL\n"
        f"ivo://cadc.nrc.ca/cred = {cred_origin()}/cred/capabilities\n"
        f"ivo://cadc.nrc.ca/skaha = {skaha_origin()}/skaha/capabilities\n",
    )


def _availability_doc(h: Handler) -> None:
    h.send(200, _availability("cred (sails sandbox) is accepting requests"), "text/xml")


def _capabilities_doc(h: Handler) -> None:
    origin = cred_origin()
    doc = _capabilities(
        origin,
        [
            ("ivo://ivoa.net/std/VOSI#capabilities",
             [(f"{origin}/cred/capabilities", "full", [])]),
            ("ivo://ivoa.net/std/VOSI#availability",
             [(f"{origin}/cred/availability", "full", [])]),
            ("ivo://ivoa.net/std/CDP#proxy-1.0",
             [(f"{origin}{CDP_CERT_PATH}", "base", [TLS_CERT]),
              (f"{origin}{CDP_PATH}", "base", [BASIC_AA])]),
        ],
    )  # fmt: skip
    h.send(200, doc, "text/xml")


def _password_certificate(h: Handler) -> None:
    """BasicAA: username + password → a proxy certificate."""
    s = settings()
    _issue(h, s, _basic_user(h, s))


def _renewed_certificate(h: Handler) -> None:
    """A still-valid client certificate → a fresh one."""
    _issue(h, settings(), h.certificate_user())


def _issue(h: Handler, s: dict[str, Any], user: str | None) -> None:
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
    h.send(200, pem, "application/x-pem-file")


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


ROUTES = [
    route("*", "/reg/resource-caps", _resource_caps),
    route("*", "/cred/availability", _availability_doc),
    route("*", "/cred/capabilities", _capabilities_doc),
    route("GET", CDP_PATH, _password_certificate),
    route("GET", CDP_CERT_PATH, _renewed_certificate),
]
