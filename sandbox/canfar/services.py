"""HTTPS stand-ins for CANFAR's Skaha session API and CADC's registry + credential service.

Shapes follow what the canfar 1.5 client sends and parses:
- ``POST session`` with form/query parameters from ``canfar.utils.build.create_parameters``
  (name, image, cores, ram, type, gpus, cmd, args, repeated ``env=K=V``); the body of the answer
  is the new session id as text (``canfar.helpers.session._response_session_id``).
- ``GET session`` (``view=stats`` for ``Session.stats``; ``type``/``status`` filters from
  ``build.fetch_parameters``) → JSON list of session records as in ``Session.fetch``'s docstring
  (id, userid, image, type, status, name, startTime, expiryTime, connectURL, requestedRAM,
  requestedCPUCores, requestedGPUCores, coresInUse, ramInUse).
- ``GET session/{id}`` → one record; ``?view=logs`` / ``?view=events`` → text;
  ``POST session/{id}?action=renew``; ``DELETE session/{id}``; ``GET image`` → [{"id", "types"}].
- Auth: a TLS client certificate signed by the CA (``X-Skaha-Authentication-Type: RUNTIME-X509``)
  or ``Authorization: Bearer`` (canfar.client ``_get_http_headers``). Errors are plain text with
  an HTTP status, as Skaha's servlet answers them.
- The registry is ``key = value`` lines; the credential service's VOSI capabilities carry the
  ``ivo://ivoa.net/std/CDP#proxy-1.0`` interface with ``ivo://ivoa.net/sso#BasicAA``; the proxy
  endpoint answers ``GET ?daysValid=N`` with HTTP basic auth by a PEM (canfar.auth.x509).

Run as ``python -m sandbox.canfar.services skaha|cred`` (the sandbox starts them).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pwd
import random
import shlex
import signal
import ssl
import string
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509

from sandbox import layout
from sandbox.canfar import ca

DATA = layout.STATE_DIR / "canfar"
SETTINGS = DATA / "settings.json"
SESSIONS = DATA / "sessions"
SKAHA_BASE = "/skaha/v1"
NO_CHECK_TIME = 0x200000  # OpenSSL X509_V_FLAG_NO_CHECK_TIME: expiry is judged per request

DEFAULT_SETTINGS: dict[str, Any] = {
    "users": {},  # name -> password
    "tokens": {},  # token -> user name
    "images": [
        "images.canfar.net/skaha/astroml:latest",
        "images.canfar.net/skaha/terminal:1.1.1",
        "images.canfar.net/casa/casa:6.6",
    ],
    "max_days_valid": 30,
    "validity_seconds": None,  # overrides daysValid (tests: certificates that expire soon)
    "start_delay": 1.0,
    "time_limit": 600,
    "fail_next_creates": 0,
    "max_cores": 16,
    "max_ram": 64,
}


def settings() -> dict[str, Any]:
    data = dict(DEFAULT_SETTINGS)
    if SETTINGS.exists():
        data.update(json.loads(SETTINGS.read_text()))
    return data


def update_settings(**changes: Any) -> dict[str, Any]:
    data = settings()
    data.update(changes)
    SETTINGS.parent.mkdir(parents=True, exist_ok=True)
    tmp = SETTINGS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o600)
    tmp.replace(SETTINGS)
    return data


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Handler(BaseHTTPRequestHandler):
    server_version = "sails-sandbox"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode() if length else ""

    def _params(self) -> list[tuple[str, str]]:
        query = urlsplit(self.path).query
        params = parse_qsl(query, keep_blank_values=True)
        if self.command in ("POST", "PUT"):
            params += parse_qsl(self._body(), keep_blank_values=True)
        return params

    def _send(self, code: int, body: str | bytes, ctype: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj), "application/json")

    def _user(self) -> str | None:
        """The caller: a valid client certificate's CN, or a known bearer token."""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return settings()["tokens"].get(auth[7:].strip())
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if not der:
            return None
        cert = x509.load_der_x509_certificate(der)
        now = dt.datetime.now(dt.UTC)
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            self._expired = cert.not_valid_after_utc
            return None
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else None

    def _unauthorised(self) -> None:
        expired = getattr(self, "_expired", None)
        if expired is not None:
            self._send(401, f"certificate expired on {expired:%Y-%m-%dT%H:%M:%SZ}\n")
        else:
            self._send(401, "Unauthorized: no valid certificate or token\n")

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def do_DELETE(self) -> None:
        self.route()

    def route(self) -> None:
        try:
            self.server.app(self)  # type: ignore[attr-defined]
        except Exception as exc:  # an answer, never a dropped connection
            self._send(500, f"internal error: {exc}\n")


# -- Skaha ---------------------------------------------------------------------------------------
class Sessions:
    """Headless sessions as real unprivileged processes with a time limit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        SESSIONS.mkdir(parents=True, exist_ok=True)

    def _path(self, sid: str) -> Path:
        return SESSIONS / sid / "session.json"

    def load(self, sid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(sid).read_text())
        except (OSError, ValueError):
            return None

    def save(self, rec: dict[str, Any]) -> None:
        path = self._path(rec["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)

    def all(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(SESSIONS.iterdir()):
            rec = self.load(d.name)
            if rec and not rec.get("deleted"):
                out.append(self.refresh(rec))
        return out

    def refresh(self, rec: dict[str, Any]) -> dict[str, Any]:
        if rec["status"] in ("Pending", "Running") and rec.get("pid"):
            rc_file = SESSIONS / rec["id"] / "exit"
            if rc_file.exists():
                code = int(rc_file.read_text().strip() or 1)
                rec["status"] = "Succeeded" if code == 0 else "Failed"
                rec["exitCode"] = code
                self.save(rec)
            elif rec["status"] == "Pending" and time.time() >= rec["_runAt"]:
                rec["status"] = "Running"
                self.save(rec)
        return rec

    def create(self, user: str, params: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        s = settings()
        sid = "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
        d = SESSIONS / sid
        d.mkdir(parents=True)
        now = time.time()
        rec = {
            "id": sid,
            "userid": user,
            "runAsUID": "65534",
            "runAsGID": "65534",
            "image": params["image"],
            "type": params.get("type", "headless"),
            "status": "Pending",
            "name": params.get("name", sid),
            "startTime": _now(),
            "expiryTime": (dt.datetime.now(dt.UTC) + dt.timedelta(days=14)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "connectURL": f"https://{layout.SERVICES_IP}:{layout.SKAHA_PORT}/session/{sid}",
            "requestedRAM": f"{params.get('ram', 1)}G",
            "requestedCPUCores": str(params.get("cores", 1)),
            "requestedGPUCores": str(params.get("gpus", "<none>")),
            "coresInUse": "0m",
            "ramInUse": "0Mi",
            "_runAt": now + float(s["start_delay"]),
        }
        command = [params.get("cmd") or "true", *shlex.split(params.get("args") or "")]
        nobody = pwd.getpwnam("nobody")
        script = (
            f"sleep {float(s['start_delay'])}; "
            f"timeout {int(s['time_limit'])} setpriv --reuid={nobody.pw_uid} "
            f"--regid={nobody.pw_gid} --clear-groups -- {shlex.join(command)} "
            f"> {d}/logs 2>&1; echo $? > {d}/exit"
        )
        os.chmod(d, 0o777)
        proc = subprocess.Popen(
            ["sh", "-c", script],
            cwd="/tmp",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": "/tmp",
                "SKAHA_SESSION_ID": sid,
                **env,
            },
        )
        rec["pid"] = proc.pid
        threading.Thread(target=proc.wait, daemon=True).start()
        self.save(rec)
        return rec

    def delete(self, rec: dict[str, Any]) -> None:
        if rec.get("pid"):
            try:
                os.killpg(rec["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        rec["deleted"] = True
        rec["status"] = "Terminating"
        self.save(rec)


def public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("pid", "deleted")}


def skaha(h: Handler, sessions: Sessions) -> None:
    path = urlsplit(h.path).path
    if not path.startswith(SKAHA_BASE):
        return h._send(404, "not found\n")
    rest = path[len(SKAHA_BASE) :].strip("/")
    user = h._user()
    if user is None:
        return h._unauthorised()
    params = h._params()
    single = dict(params)
    if rest == "image" and h.command == "GET":
        return h._json(
            200, [{"id": i, "types": ["headless", "notebook"]} for i in settings()["images"]]
        )
    if rest == "session" and h.command == "GET":
        if single.get("view") == "stats":
            return h._json(
                200,
                {
                    "cores": {
                        "requestedCPUCores": 0,
                        "coresAvailable": 16,
                        "maxCores": {"cores": 16, "withRam": "64Gi"},
                    },
                    "ram": {"maxRAM": {"ram": "64Gi", "withCores": 16}},
                },
            )
        recs = [public(r) for r in sessions.all() if r["userid"] == user]
        if single.get("type"):
            recs = [r for r in recs if r["type"] == single["type"]]
        if single.get("status"):
            recs = [r for r in recs if r["status"] == single["status"]]
        return h._json(200, recs)
    if rest == "session" and h.command == "POST":
        s = settings()
        if s["fail_next_creates"] > 0:
            update_settings(fail_next_creates=s["fail_next_creates"] - 1)
            return h._send(503, "Service Unavailable: injected failure\n")
        image = single.get("image", "")
        if image not in s["images"]:
            return h._send(400, f"image not found or not available: {image}\n")
        try:
            cores, ram = int(single.get("cores", 1)), int(single.get("ram", 1))
        except ValueError:
            return h._send(400, "cores and ram must be integers\n")
        if not (1 <= cores <= s["max_cores"]) or not (1 <= ram <= s["max_ram"]):
            return h._send(
                400,
                f"requested resources exceed the limits: cores {cores} "
                f"(max {s['max_cores']}), ram {ram}G (max {s['max_ram']}G)\n",
            )
        if single.get("type", "headless") == "headless" and not single.get("cmd"):
            pass  # the image's own entrypoint: here, nothing to run
        env = dict(v.split("=", 1) for k, v in params if k == "env" and "=" in v)
        rec = sessions.create(user, single, env)
        return h._send(200, rec["id"] + "\n")
    if rest.startswith("session/"):
        sid = rest.split("/", 1)[1]
        rec = sessions.load(sid)
        if rec is None or rec.get("deleted") or rec["userid"] != user:
            return h._send(404, f"session not found: {sid}\n")
        rec = sessions.refresh(rec)
        if h.command == "GET":
            view = single.get("view")
            if view == "logs":
                logs = SESSIONS / sid / "logs"
                return h._send(200, logs.read_bytes() if logs.exists() else b"")
            if view == "events":
                return h._send(
                    200,
                    f"{rec['startTime']} Scheduled session {sid}\n"
                    f"{rec['startTime']} Started container\n",
                )
            return h._json(200, public(rec))
        if h.command == "POST" and single.get("action") == "renew":
            rec["expiryTime"] = (dt.datetime.now(dt.UTC) + dt.timedelta(days=14)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            sessions.save(rec)
            return h._send(200, "")
        if h.command == "DELETE":
            sessions.delete(rec)
            return h._send(200, "")
    return h._send(404, "not found\n")


# -- registry and credential service -------------------------------------------------------------
def cred(h: Handler) -> None:
    path = urlsplit(h.path).path
    base = f"https://{layout.SERVICES_IP}:{layout.CRED_PORT}"
    if path == "/reg/resource-caps":
        return h._send(
            200,
            "# sandbox registry\n"
            f"ivo://cadc.nrc.ca/cred = {base}/cred/capabilities\n"
            f"ivo://cadc.nrc.ca/skaha = {base}/skaha/capabilities\n",
        )
    if path == "/cred/capabilities":
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
            'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
            '  <capability standardID="ivo://ivoa.net/std/VOSI#capabilities">\n'
            f'    <interface xsi:type="vs:ParamHTTP"><accessURL use="full">{base}/cred/'
            "capabilities</accessURL></interface>\n  </capability>\n"
            '  <capability standardID="ivo://ivoa.net/std/CDP#proxy-1.0">\n'
            '    <interface xsi:type="vs:ParamHTTP" role="std">\n'
            f'      <accessURL use="base">{base}/cred/priv</accessURL>\n'
            '      <securityMethod standardID="ivo://ivoa.net/sso#BasicAA"/>\n'
            "    </interface>\n  </capability>\n</vosi:capabilities>\n"
        )
        return h._send(200, xml, "text/xml")
    if path == "/cred/priv" and h.command == "GET":
        auth = h.headers.get("Authorization", "")
        user = password = ""
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        s = settings()
        if not user or s["users"].get(user) != password:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="CADC"')
            h.send_header("Content-Length", "0")
            return h.end_headers()
        days = int(dict(h._params()).get("daysValid") or 30)
        seconds = s["validity_seconds"] or min(days, s["max_days_valid"]) * 86400
        return h._send(
            200, ca.proxy_certificate(user, seconds=float(seconds)), "application/x-pem-file"
        )
    return h._send(404, "not found\n")


def serve(kind: str) -> None:
    port = layout.SKAHA_PORT if kind == "skaha" else layout.CRED_PORT
    cert, key = ca.server_certificate(layout.SERVICES_IP)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    if kind == "skaha":
        ctx.load_verify_locations(str(ca.ca_cert_path()))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= NO_CHECK_TIME
    server = ThreadingHTTPServer((layout.SERVICES_IP, port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    if kind == "skaha":
        sessions = Sessions()
        server.app = lambda h: skaha(h, sessions)  # type: ignore[attr-defined]
    else:
        server.app = cred  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1])
