"""What operators live with: the health check, and the two repairs it can trigger.

Each flow runs either on the VM itself (``on_vm=True``, as the deployments do) or from the
control machine over SSH.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import Action
from flows.steps import ensure_canfar_auth, probe_all
from tasks.access import load_canfar, open_vm
from tasks.arc import UNIT, ensure_arc_host_keys, home, probe_arc, vm_path
from tasks.health import FAIL, OK
from tasks.service_user import as_service_user, systemctl
from tasks.vm import StepRecord
from tasks.vm_lock import vm_exclusive

STALE_EVENT = "sails.arc.stale"
EXPIRING_EVENT = "sails.canfar.certificate-expiring"
FAILED_EVENT = "sails.health.probe-failed"


def resource(config: BootstrapConfig) -> dict[str, str]:
    return {
        "prefect.resource.id": f"sails.vm.{config.environment}",
        "prefect.resource.name": config.environment,
    }


class HealthReport(BaseModel):
    environment: str
    healthy: bool
    results: list[dict[str, Any]]


@flow(name="health-check")
def health_check(config: BootstrapConfig = BootstrapConfig(), on_vm: bool = False) -> HealthReport:
    """Every probe at once; a table artifact, an event per failing probe, and a failed run when
    a critical probe fails."""
    log = logger()
    results = probe_all(config, on_vm)
    create_table_artifact(
        key=f"health-{config.environment}",
        table=[r.row() for r in results],
        description=f"health of {config.environment}",
    )
    for r in results:
        if r.status != OK:
            emit_event(
                event=FAILED_EVENT if r.status == FAIL else "sails.health.probe-warning",
                resource=resource(config),
                payload={"probe": r.probe, "status": r.status, "detail": r.detail},
            )
        if r.probe == "arc-mount" and r.status == FAIL:
            emit_event(event=STALE_EVENT, resource=resource(config), payload={"detail": r.detail})
        if r.probe == "canfar-certificate" and r.status != OK:
            emit_event(
                event=EXPIRING_EVENT, resource=resource(config), payload={"detail": r.detail}
            )
        log.log(
            20 if r.status == OK else 30,
            "%-20s %-4s %s (%.2f s)",
            r.probe,
            r.status,
            r.detail,
            r.seconds,
        )
    critical = [r for r in results if r.status == FAIL and r.critical]
    report = HealthReport(
        environment=config.environment, healthy=not critical, results=[r.row() for r in results]
    )
    if critical:
        raise BootstrapError("unhealthy: " + "; ".join(f"{r.probe}: {r.detail}" for r in critical))
    return report


@flow(name="remount-arc")
def remount_arc(config: BootstrapConfig = BootstrapConfig(), on_vm: bool = False) -> StepRecord:
    """Kill a stale sshfs, lazy-unmount, mount again and verify; nothing when it is live."""
    log = logger()
    host = open_vm(config, on_vm)
    held = contextlib.ExitStack()
    try:
        state, detail = probe_arc(host, config)
        if state == "live":
            return StepRecord(name="/arc mount", reason="live: nothing to do")
        held.enter_context(vm_exclusive(host, config, "remount"))
        log.warning("/arc is %s (%s): remounting", state, detail)
        was = f"{state}: {detail}"
        mp = vm_path(config, config.arc.mount_point)
        # The unit, through the login user's sudo or the service user's helper; the sshfs
        # process and its mount are the service user's own to kill and unmount.
        systemctl(host, "stop", UNIT, check=False, timeout=30)
        host.run(
            as_service_user(
                config, f"pkill -9 -u \"$(id -u)\" -f '[s]shfs.* {mp}$'; fusermount3 -u -z {mp}"
            )
            + " || true",
            timeout=15,
        )
        if ensure_arc_host_keys(host, config, apply=True):  # a changed pin in the config
            log.info("/arc: wrote the pinned host keys")
        systemctl(host, "reset-failed", UNIT, check=False, timeout=30)
        systemctl(host, "start", UNIT, timeout=30)
        for _ in range(30):
            state, detail = probe_arc(host, config)
            if state == "live":
                break
            host.run("sleep 1", check=False)
        if state != "live":
            raise BootstrapError(f"/arc is still {state} after remounting: {detail}")
        create_markdown_artifact(
            key=f"remount-{config.environment}",
            markdown=f"/arc remounted at `{mp}` (was {was})",
        )
        return StepRecord(name="/arc mount", action=Action.CHANGE, reason="remounted")
    finally:
        held.close()
        host.close()


@flow(name="reauth-canfar")
def reauth_canfar(config: BootstrapConfig = BootstrapConfig(), on_vm: bool = False) -> StepRecord:
    """Renew the CANFAR certificate from the CanfarCredentials block and report its expiry."""
    host = open_vm(config, on_vm)
    try:
        creds = load_canfar(config)
        with vm_exclusive(host, config, "reauth"):
            record = cast(StepRecord, ensure_canfar_auth(host, config, creds, force=True))
        create_markdown_artifact(
            key=f"reauth-{config.environment}",
            markdown=f"CANFAR certificate renewed on `{home(config)}`: {record.reason}",
        )
        return record
    finally:
        host.close()
