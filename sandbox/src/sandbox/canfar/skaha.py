"""The Skaha session API stand-in (base ``/skaha/v1``; ``/skaha/v0`` answers the same).

Request and response shapes, with where each comes from. The client's base URL is
``CANFAR_URL`` and it appends relative paths (canfar/client.py ``_get_base_url``):
- ``POST session``, parameters from ``canfar.utils.build.create_parameters`` (name, image, cores,
  ram, type, gpus, cmd, args, one ``env=K=V`` per variable); the answer is the new id + newline
  as text/plain (opencadc/science-platform skaha PostAction.doAction; the client strips it in
  canfar/helpers/session.py ``_response_session_id``). Errors as skaha's PostAction raises them:
  "Missing parameter 'image'", "Invalid value for 'cores': N", "name can only contain ...",
  "image not found or not labelled: ..." (404), "session image must come from one of [...]".
- ``GET session`` (``type``/``status`` from ``build.fetch_parameters``; ``view=stats``;
  ``view=all``) → JSON list of records with the fields of canfar/models/session.py
  ``FetchResponse`` (skaha SessionDAO: ``connectURL`` "not-applicable" for headless,
  ``<none>`` for usage of sessions not running, requestedRAM "1G").
- ``GET session/{id}`` → one record; ``?view=logs`` → the container output as text;
  ``?view=events`` → text (canfar/sessions.py ``logs``/``events``); unknown id → 404
  "session {id} not found" (skaha SessionDAO.getSession).
- ``POST session/{id}?action=renew``; ``DELETE session/{id}`` (sessions.py ``renew``/``destroy``).
- ``GET image`` (``type`` filter) → [{"id", "types", "digest"}] (canfar/images.py,
  canfar/models/containers.py ``Image``); ``GET context`` → canfar/context.py's example shape.
- ``GET /skaha/availability`` (VOSI, canfar/overview.py) and ``/skaha/capabilities`` (VOSI with
  ``http://www.opencadc.org/std/platform#session-1``, canfar/utils/vosi.py), both anonymous.
- Auth: a TLS client certificate signed by the sandbox CA (the client's ``_get_ssl_context``)
  or ``Authorization: Bearer <token>`` (client.py ``_get_http_headers``). Anything else → 401
  "NotAuthenticatedException: ..." (opencadc cadc-rest style text/plain errors).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sandbox import layout
from sandbox.canfar.headless import SESSIONS, Sessions, public
from sandbox.canfar.store import _take_injected_failure, settings
from sandbox.canfar.vosi import COOKIE, TLS_CERT, TOKEN, _availability, _capabilities
from sandbox.canfar.web import Handler, HTTPError, dispatch, match, not_authenticated, route

SKAHA_BASE = "/skaha/v1"
SKAHA_BASES = ("/skaha/v1", "/skaha/v0")


def skaha_origin() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.SKAHA_PORT}"


def _image_digest(image: str) -> str:
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass(frozen=True)
class Call:
    """What an API handler gets besides the request: read once per request."""

    sessions: Sessions
    settings: dict[str, Any]
    user: str


def skaha(h: Handler, sessions: Sessions) -> None:
    """Anonymous VOSI paths first; under a base (``/skaha/v1``, ``/skaha/v0``) the caller is
    authenticated before the API table is looked up, so an unknown path there is a 401 for a
    stranger and a 404 for a user."""
    path = h.route_path.rstrip("/")
    found = match(VOSI_ROUTES, h.command, path)
    if found is not None:
        row, parts = found
        return row.handler(h, **parts)
    base = next((b for b in SKAHA_BASES if path == b or path.startswith(b + "/")), None)
    if base is None:
        raise HTTPError(404, f"not found: {h.route_path}")
    rest = path[len(base) :].strip("/")
    s = settings()
    user = _skaha_user(h, s)
    dispatch(API_ROUTES, h, rest, Call(sessions, s, user))


def _availability_doc(h: Handler) -> None:
    h.send(200, _availability("skaha (sails sandbox) is accepting requests"), "text/xml")


def _capabilities_doc(h: Handler) -> None:
    origin = skaha_origin()
    doc = _capabilities(
        origin,
        [
            ("ivo://ivoa.net/std/VOSI#capabilities",
             [(f"{origin}/skaha/capabilities", "full", [])]),
            ("ivo://ivoa.net/std/VOSI#availability",
             [(f"{origin}/skaha/availability", "full", [])]),
            ("http://www.opencadc.org/std/platform#session-1",
             [(f"{origin}/skaha/v1", "base", [TLS_CERT, TOKEN, COOKIE])]),
            ("vos://cadc.nrc.ca~vospace/CADC/std/Proc#sessions-1.0",
             [(f"{origin}/skaha/v0", "base", [TLS_CERT, TOKEN, COOKIE])]),
        ],
    )  # fmt: skip
    h.send(200, doc, "text/xml")


def _images(h: Handler, c: Call) -> None:
    kind = h.single.get("type")
    h.send_json(
        [
            {"id": i["id"], "types": i["types"], "digest": _image_digest(i["id"])}
            for i in c.settings["images"]
            if not kind or kind in i["types"]
        ]
    )


def _context(h: Handler, c: Call) -> None:
    s = c.settings
    cores, ram = s["core_options"], s["ram_options"]
    h.send_json(
        {
            "cores": {"default": cores[0], "defaultRequest": cores[0],
                      "defaultLimit": cores[-1], "options": cores},
            "memoryGB": {"default": ram[0], "defaultRequest": ram[0],
                         "defaultLimit": ram[-1], "options": ram},
            "gpus": {"options": s["gpu_options"]},
            "maxInteractiveSessions": 3,
        }
    )  # fmt: skip


def _list_sessions(h: Handler, c: Call) -> None:
    view = h.single.get("view")
    if view == "stats":
        return h.send_json(_stats(c.sessions, c.settings))
    recs = [public(r) for r in c.sessions.all(None if view == "all" else c.user)]
    if h.single.get("type"):
        recs = [r for r in recs if r["type"] == h.single["type"]]
    if h.single.get("status"):
        recs = [r for r in recs if r["status"] == h.single["status"]]
    h.send_json(recs)


def _own_session(c: Call, sid: str) -> dict[str, Any]:
    """The caller's session ``sid``; 404 for one that is gone or someone else's."""
    rec = c.sessions.load(sid)
    if rec is None or rec.get("_deleted") or rec["userid"] != c.user:
        raise HTTPError(404, f"session {sid} not found")
    return rec


def _get_session(h: Handler, c: Call, sid: str) -> None:
    rec = _own_session(c, sid)
    view = h.single.get("view")
    if view == "logs":
        return h.send(200, (SESSIONS / sid / "logs").read_bytes())
    if view in ("events", "event"):
        return h.send(200, "".join(e + "\n" for e in rec.get("_events", [])))
    h.send_json(public(rec))


def _session_action(h: Handler, c: Call, sid: str) -> None:
    rec = _own_session(c, sid)
    action = h.single.get("action")
    if not action:
        raise HTTPError(400, "Cannot modify an existing session")
    if action.lower() != "renew":
        raise HTTPError(400, "unrecognized action")
    c.sessions.renew(rec)
    h.send(200, "")


def _delete_session(h: Handler, c: Call, sid: str) -> None:
    c.sessions.delete(_own_session(c, sid))
    h.send(200, "")


def _session_other(h: Handler, c: Call, sid: str) -> None:
    """Any other method on a session: 404, the session's own 404 first."""
    _own_session(c, sid)
    raise HTTPError(404, f"not found: {h.route_path}")


def _skaha_user(h: Handler, s: dict[str, Any]) -> str:
    auth = h.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        user = s["tokens"].get(auth[7:].strip())
        if user is None:
            raise not_authenticated("invalid or expired token")
        return str(user)
    user = h.certificate_user()
    if user is None:
        raise not_authenticated("no client certificate or token")
    return user


def _stats(sessions: Sessions, s: dict[str, Any]) -> dict[str, Any]:
    # Shape: canfar/sessions.py ``stats`` docstring and canfar/cli/stats.py.
    active = [r for r in sessions.all() if r["status"] in ("Pending", "Running")]
    cores = sum(int(r["requestedCPUCores"]) for r in active)
    ram = sum(int(r["requestedRAM"].rstrip("G")) for r in active)
    max_cores, max_ram = s["core_options"][-1], s["ram_options"][-1]
    return {
        "instances": {"session": len(active), "desktopApp": 0, "headless": len(active),
                      "total": len(active)},
        "cores": {"requestedCPUCores": cores, "cpuCoresAvailable": max_cores,
                  "coresAvailable": max_cores,
                  "maxCores": {"cores": max_cores, "withRam": f"{max_ram}Gi"}},
        "ram": {"requestedRAM": f"{ram}G", "ramAvailable": f"{max_ram}G",
                "maxRAM": {"ram": f"{max_ram}Gi", "withCores": max_cores}},
    }  # fmt: skip


def _create(h: Handler, c: Call) -> None:
    # Checks in the order of skaha's PostAction.doAction.
    sessions, s, user = c.sessions, c.settings, c.user
    p = h.single
    image = p.get("image")
    if image is None:
        raise HTTPError(400, "Missing parameter 'image'")
    if not image.strip():
        raise HTTPError(400, "image is required")
    kind = p.get("type")
    if not any(image.startswith(host) for host in s["harbor_hosts"]):
        hosts = ",".join(s["harbor_hosts"])
        raise HTTPError(400, f"session image must come from one of [{hosts}]")
    known = next((i for i in s["images"] if i["id"] == image), None)
    if known is None:
        raise HTTPError(404, f"image not found or not labelled: {image}")
    if kind is None:
        kind = known["types"][0]
    elif kind not in known["types"]:
        raise HTTPError(400, f"image/type mismatch: {image}/{kind}")
    resources: dict[str, int] = {}
    for name, options in (("cores", s["core_options"]), ("ram", s["ram_options"])):
        raw = p.get(name)
        if raw is None:
            resources[name] = options[0]
            continue
        try:
            resources[name] = int(raw)
        except ValueError:
            raise HTTPError(400, f"Invalid value for '{name}': {raw}") from None
        if resources[name] not in options:
            raise HTTPError(400, f"Invalid value for '{name}': {raw}")
    name = p.get("name")
    if name is None:
        raise HTTPError(400, "Missing parameter 'name'")
    if not name.strip():
        raise HTTPError(400, "name must have a value")
    if not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
        raise HTTPError(400, "name can only contain alpha-numeric chars and '-'")
    gpus = p.get("gpus")
    if gpus is not None and (not gpus.isdigit() or int(gpus) not in s["gpu_options"]):
        raise HTTPError(400, f"Invalid value for 'gpus': {gpus}")
    if kind != "headless":
        raise HTTPError(400, f"the sandbox runs headless sessions only, not '{kind}'")
    status = _take_injected_failure()
    if status is not None:
        raise HTTPError(status, "TransientException: service busy (injected failure)")
    # cmd overrides the image entrypoint; args are separated by spaces (skaha API spec).
    cmd = p.get("cmd") or "true"
    command = [cmd, *(p.get("args") or "").split()]
    env = dict(v.split("=", 1) for k, v in h.params if k == "env" and "=" in v)
    rec = sessions.create(
        user,
        {"image": image, "type": kind, "name": name, "gpus": gpus or "", **resources},  # type: ignore[dict-item]
        command,
        env,
    )
    h.send(200, rec["id"] + "\n")


#: Anonymous, matched against the whole path.
VOSI_ROUTES = [
    route("*", "/skaha/availability", _availability_doc),
    route("*", "/skaha/capabilities", _capabilities_doc),
]
#: Authenticated, matched against the path below the base (``/skaha/v1``, ``/skaha/v0``);
#: handlers are called as ``handler(h, call, **parts)``.
API_ROUTES = [
    route("GET", "image", _images),
    route("GET", "context", _context),
    route("GET", "session", _list_sessions),
    route("POST", "session", _create),
    route("GET", "session/{sid}", _get_session),
    route("POST", "session/{sid}", _session_action),
    route("DELETE", "session/{sid}", _delete_session),
    route("*", "session/{sid}", _session_other),
]
