"""One CANFAR headless session, launched, waited for, read and deleted, from the VM.

A program of its own: the smoke test sends this file to the pipeline venv's python
(``python -c``) as the service user, with the session's spec as JSON in ``argv[1]``; it prints
one JSON line: the session's id, final status, the cause of a failure (``auth: …``,
``image: …``, ``quota: …`` or the client's text), its log, whether it was cleaned up and how
long it took. It needs only the standard library and the canfar client.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

#: What Skaha says of a request past the platform's offer ("Invalid value for 'cores': N") or
#: past the user's session cap ("has reached the maximum of N active sessions"): the user's
#: allowance, not a fault.
QUOTA = (
    "quota",
    "limit",
    "resource",
    "maximum of",
    "invalid value for 'cores'",
    "invalid value for 'ram'",
    "invalid value for 'gpus'",
)
FINAL = ("Succeeded", "Completed", "Failed", "Error")


def cause(exc: BaseException) -> str:
    """The failure as the operator can act on it: ``auth:``, ``image:``, ``quota:`` or the
    client's own text (the HTTP answer of a request the client swallowed into ``errors``)."""
    text = str(exc)
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic's ValidationError: the client refused its own settings
        try:
            text = "; ".join(e["msg"] for e in errors())
        except Exception:
            pass
    elif isinstance(errors, dict):
        for err in errors.values():
            response = getattr(err, "response", None)
            if response is not None:
                text = f"HTTP {response.status_code}: {response.text.strip()[:300]}"
                break
    low = text.lower()
    if "401" in text or "403" in text or "unauthori" in low or "certificate" in low:
        return "auth: " + text
    if "image" in low:
        return "image: " + text
    if any(m in low for m in QUOTA):
        return "quota: " + text
    return text


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Launch the session ``spec`` describes and follow it to its end; the result as a dict."""
    from canfar.sessions import Session

    out: dict[str, Any] = {"id": None, "status": None, "cause": None, "logs": "", "seconds": 0.0}
    start = time.monotonic()
    session = None
    try:
        session = Session(errors="raise")  # refuses an expired certificate already
        ids = session.create(
            name=spec["name"],
            image=spec["image"],
            cores=spec["cores"],
            ram=spec["ram"],
            kind="headless",
            cmd=spec["cmd"],
            args=spec["args"],
        )
        out["id"] = ids[0]
        deadline = start + spec["timeout"]
        while True:
            out["status"] = session.info(ids)[0].get("status")
            if out["status"] in FINAL:
                break
            if time.monotonic() > deadline:
                out["cause"] = f"timeout: still {out['status']} after {spec['timeout']:.0f} s"
                break
            elapsed = round(time.monotonic() - start)
            print("progress", out["status"], elapsed, file=sys.stderr, flush=True)
            time.sleep(2)
        out["logs"] = session.logs(ids).get(ids[0], "") or ""
        if out["status"] in ("Failed", "Error") and not out["cause"]:
            out["cause"] = f"session {ids[0]} ended {out['status']}"
    except Exception as exc:
        out["cause"] = cause(exc)
    finally:
        if out["id"] and session is not None:
            try:
                session.destroy([out["id"]])
            except Exception as exc:
                out["cleanup"] = str(exc)
        out["seconds"] = round(time.monotonic() - start, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
