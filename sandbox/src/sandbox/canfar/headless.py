"""Skaha's headless sessions: real unprivileged processes with a time limit, and their records."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import string
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from sandbox.canfar.store import SESSIONS, settings
from sandbox.canfar.web import HTTPError, _iso

NONE = "<none>"


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
