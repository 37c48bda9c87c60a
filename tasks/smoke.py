"""A CANFAR headless session launched from the VM, where its credentials live.

The canfar client swallows request failures unless told otherwise, so the script passes
``errors="raise"`` and turns each failure into a cause the operator can act on.
"""

from __future__ import annotations

import json
import shlex

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.config import BootstrapConfig
from core.log import logger
from core.records import Action
from tasks.canfar import vm_env_path
from tasks.service_user import as_service_user
from tasks.vm import VM, StepRecord

SCRIPT = r"""
import json, sys, time
from canfar.sessions import Session
spec = json.loads(sys.argv[1])
out = {"id": None, "status": None, "cause": None, "logs": "", "seconds": 0.0}
start = time.monotonic()
QUOTA = ("quota", "limit", "resource", "maximum of", "invalid value for 'cores'",
         "invalid value for 'ram'", "invalid value for 'gpus'")
def cause(exc):
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
                text = "HTTP %s: %s" % (response.status_code, response.text.strip()[:300])
                break
    low = text.lower()
    if "401" in text or "403" in text or "unauthori" in low or "certificate" in low:
        return "auth: " + text
    if "image" in low:
        return "image: " + text
    # Skaha refuses a request past what the platform offers as "Invalid value for 'cores': N"
    # (or 'ram', 'gpus'), and an interactive session past the user's cap as "has reached the
    # maximum of N active sessions"; both are the user's allowance, not a fault.
    if any(m in low for m in QUOTA):
        return "quota: " + text
    return text
session = None
try:
    session = Session(errors="raise")  # refuses an expired certificate already
    ids = session.create(name=spec["name"], image=spec["image"], cores=spec["cores"],
                         ram=spec["ram"], kind="headless", cmd=spec["cmd"], args=spec["args"])
    out["id"] = ids[0]
    deadline = start + spec["timeout"]
    while True:
        info = session.info(ids)[0]
        out["status"] = info.get("status")
        if out["status"] in ("Succeeded", "Completed", "Failed", "Error"):
            break
        if time.monotonic() > deadline:
            out["cause"] = "timeout: still %s after %.0f s" % (out["status"], spec["timeout"])
            break
        print("progress", out["status"], round(time.monotonic() - start), file=sys.stderr,
              flush=True)
        time.sleep(2)
    out["logs"] = session.logs(ids).get(ids[0], "") or ""
    if out["status"] in ("Failed", "Error") and not out["cause"]:
        out["cause"] = "session %s ended %s" % (ids[0], out["status"])
except Exception as exc:
    out["cause"] = cause(exc)
finally:
    if out["id"] and session is not None:
        try:
            session.destroy([out["id"]])
        except Exception as exc:
            out["cleanup"] = str(exc)
    out["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(out))
"""


class SessionRecord(StepRecord):
    """A CANFAR headless session launched from the VM: how it ended, how long it took, whether it
    was cleaned up, and the end of its log."""

    status: str | None = None
    seconds: float | None = None
    cleanup: str | None = None
    log_tail: str = ""


@task(name="canfar-smoke-test", cache_policy=NO_CACHE)
def canfar_smoke_test(vm: VM, config: BootstrapConfig) -> SessionRecord:
    """Launch, wait for, read and delete one headless session; the record says why it failed."""
    smoke = config.canfar.smoke_test
    spec = {
        "name": f"{config.environment}-smoke"[:15].rstrip("-"),
        "image": smoke.image,
        "cmd": smoke.cmd,
        "args": smoke.args,
        "cores": smoke.cores,
        "ram": smoke.ram,
        "timeout": smoke.timeout,
    }
    command = (
        f"set -a; . {shlex.quote(vm_env_path(config))}; set +a; "
        f"exec {shlex.quote(config.prefect.venv)}/bin/python -c {shlex.quote(SCRIPT)} "
        f"{shlex.quote(json.dumps(spec))}"
    )
    # as the pipeline's runs launch sessions: the service user, with its certificate
    r = vm.run(as_service_user(config, command), timeout=smoke.timeout + 120, check=False)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out = {"cause": (r.stderr or r.stdout).strip()[-500:] or f"exit {r.code}", "logs": ""}
    ok = not out.get("cause") and out.get("status") in ("Succeeded", "Completed")
    tail = "\n".join((out.get("logs") or "").splitlines()[-20:])
    logger().info(
        "smoke test session %s: %s in %ss", out.get("id"), out.get("status"), out.get("seconds")
    )
    return SessionRecord(
        name="canfar headless session",
        id=out.get("id"),
        action=Action.KEEP if ok else Action.BLOCKED,
        reason=(
            f"{out.get('status')} in {out.get('seconds')} s"
            if ok
            else f"failed: {out.get('cause')}"
        ),
        status=out.get("status"),
        seconds=out.get("seconds"),
        cleanup=out.get("cleanup"),
        log_tail=tail,
    )
