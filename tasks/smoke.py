"""A CANFAR headless session launched from the VM, where its credentials live.

The canfar client swallows request failures unless told otherwise, so the script passes
``errors="raise"`` and turns each failure into a cause the operator can act on.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from core.config import BootstrapConfig
from core.log import logger
from core.records import Action
from tasks.canfar import vm_env_path
from tasks.service_user import as_service_user
from tasks.vm import VM, StepRecord

#: Sent to the VM's python as it is (``python -c``): a program of its own, needing only the
#: standard library and the canfar client.
SCRIPT = (Path(__file__).parent / "session_probe.py").read_text()


class SessionRecord(StepRecord):
    """A CANFAR headless session launched from the VM: how it ended, how long it took, whether it
    was cleaned up, and the end of its log."""

    status: str | None = None
    seconds: float | None = None
    cleanup: str | None = None
    log_tail: str = ""


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
