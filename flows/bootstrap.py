"""The whole bootstrap: provision → configure → register → CANFAR smoke test."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from core.config import BootstrapConfig
from core.log import logger
from flows.configure import configure
from flows.provision import provision
from flows.register import register, smoke_test
from tasks.cloud.locate import VMTarget
from tasks.vm import LocalHost
from tasks.vm_lock import vm_exclusive


@flow(name="bootstrap")
def bootstrap(
    config: BootstrapConfig = BootstrapConfig(), science_codebase: str | None = None
) -> dict[str, Any]:
    """Take an empty project to a running, registered, self-checking orchestration VM."""
    log = logger()
    prov = provision(config)
    assert prov.server and prov.server.id and prov.address and prov.attachment
    target = VMTarget(
        server_id=prov.server.id,
        address=prov.address,
        volume_id=prov.attachment.volume_id,
        host_keys=prov.console_fingerprints,
        status=prov.server.status or "ACTIVE",
        fs_uuid=prov.volume.fs_uuid if prov.volume else None,
    )
    conf = configure(config, target)
    reg = register(config, target, science_codebase)
    smoke = smoke_test(config, target) if config.canfar.smoke_test.enabled else None
    summary = (
        f"# `{config.environment}` is up\n\n"
        f"- UI: [{conf.ui_url}]({conf.ui_url}) (log in with the auth string in Secret block "
        f"`{config.prefect.auth_block}`)\n"
        f"- ssh: `ssh {config.ssh.alias}`\n"
        f"- profile: `prefect profile use {config.environment}`\n"
        f"- smoke test: {smoke.reason if smoke else 'skipped'}\n"
    )
    create_markdown_artifact(key=f"bootstrap-{config.environment}", markdown=summary)
    log.info("bootstrap of %s done: %s", config.environment, conf.ui_url)
    return {
        "ui_url": conf.ui_url,
        "address": prov.address,
        "api_url": reg.api_url,
        "changed": prov.changed or conf.changed,
        "smoke": smoke.reason if smoke else None,
        "register": [r.row() for r in reg.records],
    }


def converge_from_vm(config: BootstrapConfig) -> dict[str, Any]:
    """The `bootstrap` deployment: fix cloud drift, then the repairs the VM makes itself.

    It runs as the service user, who has no root beyond its own units: the root-owned part of
    configure (packages, the volume, units, sshd, sudoers) is converged from an operator's
    machine (`sails-bootstrap configure`; `plan` names what differs)."""
    from flows.operate import remount_arc
    from tasks.arc import probe_arc

    prov = provision.fn(config, plan=False, local_ssh=False, on_vm=True)
    repairs: list[dict[str, Any]] = []
    if config.arc.enabled and probe_arc(LocalHost(), config)[0] != "live":
        repairs.append(remount_arc.fn(config, on_vm=True).row())
    if config.arc.enabled or config.canfar.smoke_test.enabled:
        from tasks.access import load_canfar
        from tasks.canfar import ensure_canfar_auth

        host = LocalHost()
        with vm_exclusive(host, config, "bootstrap"):
            record = ensure_canfar_auth(host, config, load_canfar(config))
        repairs.append(record.row())
    logger().info(
        "converged %s from the VM: %s",
        config.environment,
        ", ".join(f"{r['name']}={r['action']}" for r in repairs) or "cloud only",
    )
    return {"provision": prov.table(), "repairs": repairs}
