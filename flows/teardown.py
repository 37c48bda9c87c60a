"""Tear the VM down: delete the server, its security group, release the floating IP; keep the
volume (the data)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from core.config import BootstrapConfig
from core.log import logger
from core.records import Action, Record
from flows.steps import delete_security_group, delete_server, delete_volume, release_floating_ips
from tasks.cloud import cloud_credentials, open_connection
from tasks.local_ssh import remove_local_ssh
from tasks.register import vm_credential_name


@flow(name="teardown")
def teardown(
    config: BootstrapConfig = BootstrapConfig(),
    delete_data_volume: bool = False,
    volume_id: str | None = None,
) -> list[Record]:
    """Remove what provisioning made. Idempotent; the volume stays unless asked (``volume_id``:
    only the volume with that id, as the operator typed it)."""
    conn = open_connection(config)
    records: list[Record] = [*delete_server(conn, config), *release_floating_ips(conn, config)]
    records += delete_security_group(conn, config)
    if delete_data_volume:
        records += delete_volume(conn, config, only=volume_id)
    else:
        logger().info("keeping volume %s and its data", config.volume_name)
    # The VM's own application credential (made when the operator's are a password) goes
    # with the VM; a new VM gets a new one.
    name = vm_credential_name(config)
    if cloud_credentials(config).revoke_delegated(name, config.environment):
        records.append(
            Record(
                kind="application credential", name=name, action=Action.DELETE, reason="the VM's"
            )
        )
    remove_local_ssh(config)
    create_table_artifact(
        key=f"teardown-{config.environment}",
        table=[r.row() for r in records] or [{"resource": "-", "action": "nothing to remove"}],
    )
    return records
