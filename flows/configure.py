"""Configure the VM over SSH: cloud-init's first boot, packages, volume, /arc, CANFAR auth, the
Prefect server, operator keys."""

from __future__ import annotations

import contextlib

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field, SecretStr

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import Action
from flows.steps import (
    check_prefect_version,
    ensure_arc_mount,
    ensure_ca_bundle,
    ensure_canfar_auth,
    ensure_canfar_key,
    ensure_database,
    ensure_operator_keys,
    ensure_packages,
    ensure_prefect_server,
    ensure_prefect_venv,
    ensure_service_user,
    ensure_sshd_keepalive,
    ensure_volume_mounted,
    locate_vm,
    record_fs_uuid,
    wait_for_cloud_init,
    wait_for_ssh,
)
from tasks.access import load_canfar, vm_for
from tasks.arc import arc_user
from tasks.cloud import open_connection
from tasks.cloud.locate import VMTarget
from tasks.database import database_url
from tasks.postgres_role import database_password
from tasks.prefect_server import server_secrets
from tasks.venvs import local_prefect_version
from tasks.vm import VM, LocalHost, StepRecord
from tasks.vm_lock import vm_exclusive


class ConfigureResult(BaseModel):
    environment: str
    address: str
    plan: bool = False
    records: list[StepRecord] = Field(default_factory=list)
    ui_url: str = ""
    canfar_public_key: str = ""

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)


def _publish(result: ConfigureResult, config: BootstrapConfig) -> None:
    if result.plan:
        create_table_artifact(
            key=f"plan-vm-{config.environment}",
            table=[r.row() for r in result.records],
            description=f"what configure would change on {result.address} (nothing was changed)",
        )
        return
    create_table_artifact(
        key=f"configure-{config.environment}",
        table=[r.row() for r in result.records],
        description=f"what configure checked and changed on {result.address}",
    )
    create_markdown_artifact(
        key=f"vm-{config.environment}",
        markdown=(
            f"# `{config.environment}` configured\n\n"
            f"- Prefect UI: [{result.ui_url}]({result.ui_url}) while `ssh -N "
            f"{config.ssh.alias}` runs (the server listens on the VM's loopback only)\n"
            f"- ssh: `ssh {config.ssh.alias}`\n"
            f"- changed: {', '.join(r.name for r in result.records if r.changed) or 'nothing'}\n"
        ),
    )
    if result.canfar_public_key:
        create_markdown_artifact(
            key=f"canfar-key-{config.environment}",
            markdown=(
                "# The VM's key for CANFAR /arc\n\nAdd this line to `~/.ssh/authorized_keys` in "
                "your CANFAR home (for example from a CANFAR session's terminal), then run "
                f"`sails-bootstrap configure` again:\n\n```\n{result.canfar_public_key}\n```\n"
            ),
        )


def configure_host(
    host: VM,
    config: BootstrapConfig,
    volume_id: str | None,
    address: str,
    plan: bool = False,
    fs_uuid: str | None = None,
) -> ConfigureResult:
    """Every VM step, on ``host`` (SSH to the VM, or the VM itself; its opener closes it). With
    ``plan``, every step reads the VM and says what it would change; nothing is written,
    installed or restarted."""
    if volume_id is None:
        raise BootstrapError("the volume is not attached to the server; run provision first")
    apply = not plan
    result = ConfigureResult(environment=config.environment, address=address, plan=plan)
    records = result.records
    held = contextlib.ExitStack()
    try:
        if not isinstance(host, LocalHost):
            records.append(wait_for_ssh(host, config.ssh.connect_timeout))
        # cloud-init first (it makes the user, mounts /mnt, may run apt), then the packages
        # every later step relies on, before any disk is touched.
        records.append(wait_for_cloud_init(host, config.server.boot_timeout))
        if apply:  # one changing run on the VM at a time (a plan only reads)
            held.enter_context(vm_exclusive(host, config, "configure"))
        records.append(ensure_packages(host, config, apply))
        mounted = ensure_volume_mounted(host, config, volume_id, apply, fs_uuid)
        records.append(mounted)
        if apply and mounted.id and mounted.id != fs_uuid:
            if fs_uuid:  # formatted by hand since: the volume says what is there now
                logger().warning(
                    "volume %s holds filesystem %s, not %s as recorded",
                    volume_id,
                    mounted.id,
                    fs_uuid,
                )
            record_fs_uuid(open_connection(config), volume_id, mounted.id)
        # the database before anything else on the volume: a switch it would refuse stops here
        db = config.prefect.database
        password = database_password(config, apply, host) if db.kind == "postgresql" else None
        database = ensure_database(host, config, password, apply)
        records.append(database)
        if database.action == Action.BLOCKED:
            raise BootstrapError(f"database: {database.reason}")
        url = SecretStr(database_url(db, password.get_secret_value())) if password else None
        records.append(ensure_operator_keys(host, config, apply))
        records.append(ensure_sshd_keepalive(host, apply))
        records.append(ensure_service_user(host, config, apply))
        records.append(ensure_ca_bundle(host, config, apply))
        if config.arc.enabled or config.canfar.smoke_test.enabled:
            creds = load_canfar(config)
            records.append(ensure_canfar_auth(host, config, creds, apply=apply))
        if config.arc.enabled:
            key = ensure_canfar_key(host, config, apply)
            result.canfar_public_key = key.public_key
            records.append(key)
            user = arc_user(config, creds.username)
            records.append(ensure_arc_mount(host, config, user, apply))
        secret = server_secrets(config, apply=apply, host=host)
        # a new Prefect version on a server with history: upgraded with a way back
        wanted = config.prefect.version or local_prefect_version()
        version = check_prefect_version(host, config, secret, wanted, apply)
        records.append(version)
        if version.action == Action.BLOCKED:
            raise BootstrapError(f"{version.name}: {version.reason}")
        venv_changed = False
        if apply or not version.changed:  # (in a plan, the pending upgrade builds the venv)
            venv = ensure_prefect_venv(host, config, apply=apply)
            records.append(venv)
            venv_changed = venv.changed
        records.append(
            ensure_prefect_server(
                host,
                config,
                secret,
                apply,
                venv_changed=venv_changed,
                database_url=url,
                database_restart=database.restart_with_server,
            )
        )
        result.ui_url = config.ui_url
    except BootstrapError as exc:
        if apply:
            raise
        # In a plan, a step that would refuse ends the plan there, named like any other row.
        if not (records and records[-1].action == Action.BLOCKED):
            records.append(
                StepRecord(name="next step", action=Action.BLOCKED, applied=False, reason=str(exc))
            )
    finally:
        held.close()
        if records:
            _publish(result, config)
    blocked = [r for r in records if r.action == Action.BLOCKED]
    if blocked and apply:
        raise BootstrapError("; ".join(f"{r.name}: {r.reason}" for r in blocked))
    logger().info(
        "%s %s: %s",
        "plan for" if plan else "configured",
        address,
        ", ".join(f"{r.name}={r.action}" for r in records),
    )
    return result


@flow(name="configure")
def configure(
    config: BootstrapConfig = BootstrapConfig(),
    target: VMTarget | None = None,
    plan: bool = False,
) -> ConfigureResult:
    """Bring the VM to the configured state; a second run changes nothing. ``plan=True`` only
    reports what would change."""
    if target is None:
        target = locate_vm(open_connection(config), config)
    host = vm_for(config, target)
    try:
        return configure_host(host, config, target.volume_id, target.address, plan, target.fs_uuid)
    finally:
        host.close()
