"""Provision the cloud side of the VM: keypair, rules, server, floating IP, volume, local ssh.

Independent work runs at once (keypair, rules, volume and an address while the server builds),
so the wall time approaches the critical path: preflight → keypair → server → floating IP →
host keys. Preflight reads what exists once; a run that changes nothing reads nothing again.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from core.config import BootstrapConfig
from core.errors import BootstrapError, PreflightError
from core.log import logger
from core.records import (
    Action,
    AttachmentRecord,
    FloatingIPRecord,
    LocalSSHRecord,
    Record,
    ServerRecord,
    VolumeRecord,
)
from flows.steps import console_fingerprints, ensure_local_ssh, preflight, submitted
from tasks.access import load_key
from tasks.cloud import open_connection
from tasks.cloud.converge import converge
from tasks.cloud.server import boot_time_left


class ProvisionResult(BaseModel):
    """What the cloud holds for this environment after the run (or would, in plan mode)."""

    environment: str
    plan: bool
    records: list[Record] = Field(default_factory=list)
    server: ServerRecord | None = None
    floating_ip: FloatingIPRecord | None = None
    volume: VolumeRecord | None = None
    attachment: AttachmentRecord | None = None
    local_ssh: LocalSSHRecord | None = None
    console_fingerprints: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)

    @property
    def address(self) -> str | None:
        return self.floating_ip.address if self.floating_ip else None

    def table(self) -> list[dict[str, str]]:
        return [r.row() for r in self.records]


def artifact_key(kind: str, config: BootstrapConfig) -> str:
    return f"{kind}-{config.environment}"


def _publish(result: ProvisionResult, config: BootstrapConfig) -> None:
    kind = "plan" if result.plan else "provision"
    create_table_artifact(
        key=artifact_key(f"{kind}-resources", config),
        table=result.table(),
        description=f"{kind} of environment {config.environment}: one row per resource",
    )
    if result.plan:
        lines = [f"# Plan for `{config.environment}`", ""]
        for r in result.records:
            lines.append(f"- **{r.kind}** `{r.name}`: {r.action} — {r.reason or '-'}")
        create_markdown_artifact(key=artifact_key("plan", config), markdown="\n".join(lines))
        return
    server, att = result.server, result.attachment
    md = [
        f"# `{config.environment}` provisioned",
        "",
        "| | |",
        "|---|---|",
        f"| server | `{server.name if server else '-'}` (`{server.id if server else '-'}`), "
        f"{server.status if server else '-'} |",
        f"| floating IP | `{result.address or '-'}` |",
        f"| fixed IP | `{server.fixed_ip if server else '-'}` |",
        f"| volume | `{att.volume_id if att else '-'}` at `{att.device_path if att else '-'}` |",
        f"| ssh | `ssh {config.ssh.alias}` (user {config.server.user}) |",
        f"| host keys | {', '.join(result.console_fingerprints) or 'not shown on console'} |",
        "",
        "Changed: "
        + (", ".join(f"{r.kind} ({r.action})" for r in result.records if r.changed) or "nothing"),
    ]
    create_markdown_artifact(key=artifact_key("provision", config), markdown="\n".join(md))


@flow(name="provision", task_runner=ThreadPoolTaskRunner(max_workers=8))  # type: ignore[arg-type]
def provision(
    config: BootstrapConfig = BootstrapConfig(),
    plan: bool = False,
    local_ssh: bool = True,
    on_vm: bool = False,
) -> ProvisionResult:
    """Make the cloud hold exactly what ``config`` describes; ``plan=True`` only reports.
    ``on_vm``: run by the VM's own `bootstrap` deployment (no private key there)."""
    apply = not plan
    log = logger()
    key = load_key(config, apply, on_vm)
    conn = open_connection(config)
    result = ProvisionResult(environment=config.environment, plan=plan)
    try:
        facts = preflight(conn, config, key)
    except PreflightError as exc:
        if apply:
            raise
        result.records = [
            Record(
                kind="preflight",
                name=config.environment,
                action=Action.BLOCKED,
                reason=p,
                applied=False,
            )
            for p in exc.problems
        ]
        _publish(result, config)
        return result

    cloud = converge(conn, config, key, facts, apply, run=submitted)
    result.server = cloud.server
    result.floating_ip = cloud.floating_ip
    result.volume = cloud.volume
    result.attachment = cloud.attachment
    result.records = cloud.records()
    if apply and local_ssh and result.server.id and result.address:
        server_id = result.server.id
        booting = boot_time_left(result.server, config.server.boot_timeout)

        def from_console() -> list[str]:
            # Printed by cloud-init's final stage, a minute or more after ACTIVE on a real cloud.
            # A server up for longer than the boot bound prints nothing new: read it once.
            result.console_fingerprints = console_fingerprints(conn, server_id, wait=booting)
            return result.console_fingerprints

        # ACTIVE means the hypervisor started the guest: ensure_local_ssh first waits for its
        # port 22 (no route / refused while it boots), then reads its host keys.

        result.local_ssh = ensure_local_ssh(config, key, result.address, from_console, apply)
        if not result.console_fingerprints:
            result.console_fingerprints = result.local_ssh.host_keys
        result.records.append(result.local_ssh)
    blocked = [r for r in result.records if r.action == Action.BLOCKED]
    _publish(result, config)
    if blocked and apply:
        raise BootstrapError("; ".join(f"{r.kind} {r.name}: {r.reason}" for r in blocked))
    log.info(
        "%s %s: %s",
        "plan for" if plan else "provisioned",
        config.environment,
        ", ".join(f"{r.kind}={r.action}" for r in result.records),
    )
    return result
