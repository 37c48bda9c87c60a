"""The whole bootstrap: provision → configure → register → CANFAR smoke test."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.configure import configure, configure_host
from flows.provision import load_key, provision
from flows.register import register, smoke_test
from sails_bootstrap.config import BootstrapConfig
from tasks.cloud import VMTarget
from tasks.log import logger
from tasks.vm import LocalHost


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
    """The `bootstrap` deployment: fix cloud drift and the VM's own state, from the VM."""
    prov = provision.fn(config, plan=False, local_ssh=False, on_vm=True)
    volume_id = prov.attachment.volume_id if prov.attachment else None
    conf = configure_host(
        LocalHost(login_key=load_key(config, apply=False, on_vm=True).public_key),
        config,
        volume_id,
        prov.address or "127.0.0.1",
        fs_uuid=prov.volume.fs_uuid if prov.volume else None,
    )
    return {"provision": prov.table(), "configure": [r.row() for r in conf.records]}
