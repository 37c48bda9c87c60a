"""Tear the VM down: delete the server, release the floating IP; keep the volume (the data)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from sails_bootstrap.config import BootstrapConfig
from tasks.cloud import delete_server, delete_volume, open_connection, release_floating_ips
from tasks.local_ssh import remove_local_ssh
from tasks.log import logger
from tasks.records import Record


@flow(name="teardown")
def teardown(
    config: BootstrapConfig = BootstrapConfig(), delete_data_volume: bool = False
) -> list[Record]:
    """Remove what provisioning made. Idempotent; the volume stays unless asked."""
    conn = open_connection(config)
    records: list[Record] = [*delete_server(conn, config), *release_floating_ips(conn, config)]
    if delete_data_volume:
        records += delete_volume(conn, config)
    else:
        logger().info("keeping volume %s and its data", config.volume_name)
    remove_local_ssh(config)
    create_table_artifact(
        key=f"teardown-{config.environment}",
        table=[r.row() for r in records] or [{"resource": "-", "action": "nothing to remove"}],
    )
    return records
