"""HTTPS stand-ins for CANFAR's Skaha session API and CADC's registry + credential service.

Request and response shapes, with where each comes from:

Skaha (base ``/skaha/v1``; ``/skaha/v0`` answers the same). The client's base URL is
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

Registry + credential service:
- ``GET /reg/resource-caps`` → ``uri = url`` lines (canfar/auth/x509.py ``_certificate_url``).
- ``GET /cred/capabilities`` → VOSI capabilities; the ``ivo://ivoa.net/std/CDP#proxy-1.0``
  capability has a client-certificate interface and a ``ivo://ivoa.net/sso#BasicAA`` one; the
  client picks the BasicAA one (x509.py ``_certificate_url``).
- ``GET <BasicAA accessURL>?daysValid=N`` with HTTP basic auth → PEM certificate + key
  (x509.py ``gather``); a wrong password → 401 with ``WWW-Authenticate: Basic``.

Run as ``python -m sandbox.canfar.services skaha|cred`` (``sandbox.canfar.up`` starts them).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509

from sandbox import ca, layout

DATA = layout.STATE_DIR / "canfar"
SETTINGS = DATA / "settings.json"
SESSIONS = DATA / "sessions"
SKAHA_BASE = "/skaha/v1"
SKAHA_BASES = ("/skaha/v1", "/skaha/v0")
CDP_PATH = "/cred/priv"  # BasicAA: username + password → proxy certificate
CDP_CERT_PATH = "/cred/priv/cert"  # a still-valid client certificate → a fresh one
NO_CHECK_TIME = 0x200000  # OpenSSL X509_V_FLAG_NO_CHECK_TIME: expiry is judged per request
NONE = "<none>"

DEFAULT_SETTINGS: dict[str, Any] = {
    "users": {},  # name -> password (credential service)
    "tokens": {},  # bearer token -> user name (session API)
    "images": [
        {"id": "images.canfar.net/skaha/astroml:latest", "types": ["notebook", "headless"]},
        {"id": "images.canfar.net/skaha/terminal:1.1.1", "types": ["headless"]},
        {"id": "images.canfar.net/casa/casa:6.6", "types": ["headless", "desktop-app"]},
    ],
    "harbor_hosts": ["images.canfar.net"],
    "max_days_valid": 30,  # cap on daysValid, as CADC caps it
    "validity_seconds": None,  # overrides daysValid (tests: certificates that expire soon)
    "start_delay": 1.0,  # seconds a new session stays Pending
    "time_limit": 600,  # seconds a headless session may run (its expiry)
    "fail_next_creates": 0,  # the next N session creations fail ...
    "fail_status": 503,  # ... with this status
    "core_options": list(range(1, 17)),
    "ram_options": [1, 2, 4, 8, 16, 32, 64],
    "gpu_options": [],
}


# -- settings shared with the control side (sandbox.canfar), re-read on every request --------
@contextlib.contextmanager
def _locked() -> Iterator[None]:
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "settings.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _read() -> dict[str, Any]:
    data = dict(DEFAULT_SETTINGS)
    with contextlib.suppress(OSError, ValueError):
        data.update(json.loads(SETTINGS.read_text()))
    data["images"] = [i if isinstance(i, dict) else {"id": i, "types": ["headless"]} for i in
                      data["images"]]  # fmt: skip
    return data


def _write(data: dict[str, Any]) -> None:
    tmp = SETTINGS.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    tmp.replace(SETTINGS)


def settings() -> dict[str, Any]:
    with _locked():
        return _read()


def update_settings(**changes: Any) -> dict[str, Any]:
    unknown = set(changes) - set(DEFAULT_SETTINGS)
    if unknown:
        raise KeyError(f"unknown settings: {sorted(unknown)}")
    with _locked():
        data = _read()
        data.update(changes)
        _write(data)
        return data


def _take_injected_failure() -> int | None:
    """Consume one injected create failure; its HTTP status, or None."""
    with _locked():
        data = _read()
        if data["fail_next_creates"] <= 0:
            return None
        data["fail_next_creates"] -= 1
        _write(data)
        return int(data["fail_status"])


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


# -- Skaha sessions --------------------------------------------------------------------------
class Sessions:
    """Headless sessions as real unprivileged processes with a time limit.

    Each session is a record (``sessions/<id>/session.json``), its output (``.../logs``) and,
    while it runs, a process group owned by the caller's local account (else ``nobody``).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        SESSIONS.mkdir(parents=True, exist_ok=True)
        for d in SESSIONS.iterdir():  # deleted sessions leave nothing behind
            rec = self.load(d.name)
            if rec is None or rec.get("_deleted") or rec.get("deleted"):
                shutil.rmtree(d, ignore_errors=True)
        for rec in self._records():  # sessions of a previous run of this service are gone
            if rec["status"] in ("Pending", "Running"):
                self._append_log(rec["id"], "session lost: the session service restarted\n")
                self._finish(rec, 137)

    # records
    def _path(self, sid: str) -> Path:
        return SESSIONS / sid / "session.json"

    def load(self, sid: str) -> dict[str, Any] | None:
        if not sid or any(c not in string.ascii_lowercase + string.digits for c in sid):
            return None
        try:
            return json.loads(self._path(sid).read_text())
        except (OSError, ValueError):
            return None

    def save(self, rec: dict[str, Any]) -> None:
        path = self._path(rec["id"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)

    def _records(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(SESSIONS.iterdir(), key=lambda p: p.stat().st_mtime):
            rec = self.load(d.name)
            if rec and not rec.get("_deleted"):
                out.append(rec)
        return out

    def all(self, user: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self._records() if user is None or r["userid"] == user]

    def _append_log(self, sid: str, text: str) -> None:
        with open(SESSIONS / sid / "logs", "a") as fh:
            fh.write(text)

    def _event(self, rec: dict[str, Any], reason: str, message: str) -> None:
        rec.setdefault("_events", []).append(f"{_iso(time.time())}  Normal  {reason}  {message}")

    def _finish(self, rec: dict[str, Any], code: int) -> None:
        rec["status"] = "Succeeded" if code == 0 else "Failed"
        rec["_exitCode"] = code
        rec["cpuCoresInUse"] = rec["ramInUse"] = NONE
        self._event(rec, "Completed" if code == 0 else "Failed", f"container exited with {code}")
        self.save(rec)

    # life cycle
    def create(
        self, user: str, params: dict[str, str], command: list[str], env: dict[str, str]
    ) -> dict[str, Any]:
        s = settings()
        alphabet = string.ascii_lowercase + string.digits
        while True:
            sid = "".join(secrets.choice(alphabet) for _ in range(8))
            if not (SESSIONS / sid).exists():
                break
        (SESSIONS / sid).mkdir(parents=True)
        (SESSIONS / sid / "logs").touch()
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            account = pwd.getpwnam("nobody")
        now = time.time()
        gpus = params.get("gpus")
        rec: dict[str, Any] = {
            "id": sid,
            "userid": user,
            "runAsUID": str(account.pw_uid),
            "runAsGID": str(account.pw_gid),
            "supplementalGroups": [],
            "appid": NONE,
            "image": params["image"],
            "type": params["type"],
            "status": "Pending",
            "name": params["name"],
            "startTime": _iso(now),
            "expiryTime": _iso(now + float(s["time_limit"])),
            "connectURL": "not-applicable",
            "requestedRAM": f"{params['ram']}G",
            "requestedCPUCores": str(params["cores"]),
            "requestedGPUCores": gpus if gpus else NONE,
            "ramInUse": NONE,
            "gpuRAMInUse": NONE,
            "cpuCoresInUse": NONE,
            "gpuUtilization": NONE,
            "isFixedResources": True,
            "_deadline": now + float(s["time_limit"]),
        }
        self._event(rec, "Scheduled", f"Successfully assigned skaha-workload/{sid} to sandbox")
        self.save(rec)
        threading.Thread(
            target=self._run,
            args=(sid, command, env, account, float(s["start_delay"])),
            daemon=True,
            name=f"session-{sid}",
        ).start()
        return rec

    def _run(
        self,
        sid: str,
        command: list[str],
        env: dict[str, str],
        account: pwd.struct_passwd,
        delay: float,
    ) -> None:
        end = time.monotonic() + delay
        while time.monotonic() < end:
            rec = self.load(sid)
            if rec is None or rec.get("_deleted"):
                return
            time.sleep(0.05)
        work = SESSIONS / sid / "work"
        work.mkdir(exist_ok=True)
        os.chown(work, account.pw_uid, account.pw_gid)
        full_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "USER": account.pw_name,
            "LANG": "C.UTF-8",
            **env,
        }
        argv = [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "--",
            *command,
        ]
        with self.lock:
            rec = self.load(sid)
            if rec is None or rec.get("_deleted"):
                return
            with open(SESSIONS / sid / "logs", "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs[sid] = proc
            rec.update(status="Running", _pid=proc.pid, cpuCoresInUse="0.001", ramInUse="1M")
            self._event(rec, "Pulled", f'Container image "{rec["image"]}" already present')
            self._event(rec, "Started", "Started container")
            self.save(rec)
        while proc.poll() is None:
            rec = self.load(sid) or {}
            if time.time() > float(rec.get("_deadline", 0)):
                self._kill(proc.pid)
                proc.wait()
                self._append_log(sid, "\nsession expired: time limit reached\n")
                break
            time.sleep(0.1)
        with self.lock:
            self.procs.pop(sid, None)
            rec = self.load(sid)
            if rec is None or rec.get("_deleted"):
                return
            code = proc.returncode
            self._finish(rec, code if code >= 0 else 128 - code)

    @staticmethod
    def _kill(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def renew(self, rec: dict[str, Any]) -> None:
        if rec["status"] not in ("Pending", "Running"):
            raise HTTPError(400, f"No active job for user {rec['userid']} with session {rec['id']}")
        limit = float(settings()["time_limit"])
        rec["_deadline"] = time.time() + limit
        rec["expiryTime"] = _iso(rec["_deadline"])
        self.save(rec)

    def delete(self, rec: dict[str, Any]) -> None:
        with self.lock:
            rec = self.load(rec["id"]) or rec
            rec["_deleted"] = True
            rec["status"] = "Terminating"
            self.save(rec)
            proc = self.procs.pop(rec["id"], None)
        if proc is not None:
            self._kill(proc.pid)

    def kill_all(self) -> None:
        with self.lock:
            for proc in list(self.procs.values()):
                self._kill(proc.pid)


def live_sessions(user: str | None = None) -> list[dict[str, Any]]:
    """Session records not deleted (read from the state directory, as the service keeps them)."""
    out = []
    for path in sorted(SESSIONS.glob("*/session.json")) if SESSIONS.exists() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not rec.get("_deleted") and (user is None or rec.get("userid") == user):
            out.append(public(rec))
    return out


def public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


VOSI_CAPS = "http://www.ivoa.net/xml/VOSICapabilities/v1.0"
VS = "http://www.ivoa.net/xml/VODataService/v1.1"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _capabilities(base: str, caps: list[tuple[str, list[tuple[str, str, list[str]]]]]) -> str:
    """A VOSI capabilities document: (standardID, [(accessURL, use, [securityMethod])])."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<vosi:capabilities xmlns:vosi="{VOSI_CAPS}" xmlns:vs="{VS}" xmlns:xsi="{XSI}">',
    ]
    for std, interfaces in caps:
        parts.append(f'  <capability standardID="{std}">')
        for url, use, methods in interfaces:
            parts.append('    <interface xsi:type="vs:ParamHTTP" role="std">')
            parts.append(f'      <accessURL use="{use}">{url}</accessURL>')
            parts += [f'      <securityMethod standardID="{m}"/>' for m in methods]
            parts.append("    </interface>")
        parts.append("  </capability>")
    parts.append("</vosi:capabilities>")
    return "\n".join(parts) + "\n"


def _availability(note: str) -> str:
    # VOSI availability, as canfar/overview.py parses it.
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        "  <vosi:available>true</vosi:available>\n"
        f"  <vosi:note>{note}</vosi:note>\n"
        "</vosi:availability>\n"
    )


TLS_CERT = "ivo://ivoa.net/sso#tls-with-certificate"
TOKEN = "ivo://ivoa.net/sso#token"
BASIC_AA = "ivo://ivoa.net/sso#BasicAA"
COOKIE = "ivo://ivoa.net/sso#cookie"


def skaha_origin() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.SKAHA_PORT}"


def cred_origin() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.CRED_PORT}"


def _image_digest(image: str) -> str:
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


def skaha(h: Handler, sessions: Sessions) -> None:
    path = h.route_path.rstrip("/")
    if path == "/skaha/availability":
        return h.send(200, _availability("skaha (sails sandbox) is accepting requests"), "text/xml")
    if path == "/skaha/capabilities":
        origin = skaha_origin()
        doc = _capabilities(
            origin,
            [
                ("ivo://ivoa.net/std/VOSI#capabilities", [(f"{origin}{path}", "full", [])]),
                ("ivo://ivoa.net/std/VOSI#availability",
                 [(f"{origin}/skaha/availability", "full", [])]),
                ("http://www.opencadc.org/std/platform#session-1",
                 [(f"{origin}/skaha/v1", "base", [TLS_CERT, TOKEN, COOKIE])]),
                ("vos://cadc.nrc.ca~vospace/CADC/std/Proc#sessions-1.0",
                 [(f"{origin}/skaha/v0", "base", [TLS_CERT, TOKEN, COOKIE])]),
            ],
        )  # fmt: skip
        return h.send(200, doc, "text/xml")
    base = next((b for b in SKAHA_BASES if path == b or path.startswith(b + "/")), None)
    if base is None:
        raise HTTPError(404, f"not found: {h.route_path}")
    rest = path[len(base) :].strip("/")
    s = settings()
    user = _skaha_user(h, s)
    if rest == "image" and h.command == "GET":
        kind = h.single.get("type")
        return h.send_json(
            [
                {"id": i["id"], "types": i["types"], "digest": _image_digest(i["id"])}
                for i in s["images"]
                if not kind or kind in i["types"]
            ]
        )
    if rest == "context" and h.command == "GET":
        cores, ram = s["core_options"], s["ram_options"]
        return h.send_json(
            {
                "cores": {"default": cores[0], "defaultRequest": cores[0],
                          "defaultLimit": cores[-1], "options": cores},
                "memoryGB": {"default": ram[0], "defaultRequest": ram[0],
                             "defaultLimit": ram[-1], "options": ram},
                "gpus": {"options": s["gpu_options"]},
                "maxInteractiveSessions": 3,
            }
        )  # fmt: skip
    if rest == "session" and h.command == "GET":
        view = h.single.get("view")
        if view == "stats":
            return h.send_json(_stats(sessions, s))
        recs = [public(r) for r in sessions.all(None if view == "all" else user)]
        if h.single.get("type"):
            recs = [r for r in recs if r["type"] == h.single["type"]]
        if h.single.get("status"):
            recs = [r for r in recs if r["status"] == h.single["status"]]
        return h.send_json(recs)
    if rest == "session" and h.command == "POST":
        return _create(h, sessions, s, user)
    if rest.startswith("session/") and rest.count("/") == 1:
        sid = rest.split("/", 1)[1]
        rec = sessions.load(sid)
        if rec is None or rec.get("_deleted") or rec["userid"] != user:
            raise HTTPError(404, f"session {sid} not found")
        if h.command == "GET":
            view = h.single.get("view")
            if view == "logs":
                return h.send(200, (SESSIONS / sid / "logs").read_bytes())
            if view in ("events", "event"):
                return h.send(200, "".join(e + "\n" for e in rec.get("_events", [])))
            return h.send_json(public(rec))
        if h.command == "POST":
            action = h.single.get("action")
            if not action:
                raise HTTPError(400, "Cannot modify an existing session")
            if action.lower() != "renew":
                raise HTTPError(400, "unrecognized action")
            sessions.renew(rec)
            return h.send(200, "")
        if h.command == "DELETE":
            sessions.delete(rec)
            return h.send(200, "")
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


def _create(h: Handler, sessions: Sessions, s: dict[str, Any], user: str) -> None:
    # Checks in the order of skaha's PostAction.doAction.
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


# -- registry and credential service ---------------------------------------------------------
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


# -- entry point -----------------------------------------------------------------------------
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
