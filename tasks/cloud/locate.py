"""Where the environment's VM is: its address, volume and host keys, read from the cloud."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.config import BootstrapConfig
from core.errors import BootstrapError
from tasks.cloud import FS_UUID_KEY, our_servers, our_volumes
from tasks.cloud.console import console_fingerprints
from tasks.cloud.floating_ip import server_port

if TYPE_CHECKING:
    from openstack.connection import Connection


@dataclass
class VMTarget:
    """Where the VM is, as the cloud says: what the configure and health flows need."""

    server_id: str
    address: str
    volume_id: str | None
    host_keys: list[str]
    status: str
    fs_uuid: str | None = None  # recorded on the volume (FS_UUID_KEY)


def locate_vm(conn: Connection, config: BootstrapConfig) -> VMTarget:
    """Find this environment's server, floating IP and volume. Makes no writes."""
    servers = [s for s in our_servers(conn, config) if s.status != "ERROR"]
    if not servers:
        raise BootstrapError(
            f"no server {config.server_name!r} of environment {config.environment!r}; "
            "run `sails-bootstrap provision` first"
        )
    server = servers[0]
    port = server_port(conn, server.id)
    fips = list(conn.network.ips(port_id=port.id)) if port is not None else []
    if not fips:
        raise BootstrapError(
            f"server {server.name} has no floating IP; run `sails-bootstrap provision`"
        )
    volumes = [
        v
        for v in our_volumes(conn, config)
        if any(a.get("server_id") == server.id for a in v.attachments or [])
    ]
    return VMTarget(
        server_id=server.id,
        address=fips[0].floating_ip_address,
        volume_id=volumes[0].id if volumes else None,
        host_keys=console_fingerprints(conn, server.id, wait=0),
        status=server.status,
        fs_uuid=(volumes[0].metadata or {}).get(FS_UUID_KEY) if volumes else None,
    )
