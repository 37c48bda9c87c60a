"""Cloud steps on openstacksdk: read what exists, compare with the config, change only what differs.

One module per cloud resource (``keypair``, ``secgroup``, ``server``, ``floating_ip``, ``volume``),
the read-only checks before anything is touched (``preflight``), the host keys a server prints
(``console``) and where the VM is (``locate``). Every ``ensure_*`` step takes ``apply``: with
``apply=False`` it computes the same decision and returns the same record without writing (plan
mode is this code path, not a second one). What this tool created is found again by name plus a
marker (server and volume metadata, the floating IP's description, the group's description), so
no state file is kept and a run killed anywhere converges. This module holds what they share:
the connection, the markers and the finders of what is ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import Progress
from tasks.blocks import load_block

if TYPE_CHECKING:
    from openstack.connection import Connection

    from blocks.openstack import OpenStackCredentials


MARKER = "sails-bootstrap"  # metadata key on servers and volumes we create


#: Volume metadata: the UUID of the filesystem configure made (or found) there. A volume with one
#: is never formatted again, whatever the guest reads on it.
FS_UUID_KEY = "sails-bootstrap-fs-uuid"


def cloud_credentials(config: BootstrapConfig) -> OpenStackCredentials:
    """The named OpenStackCredentials block, or the clouds.yaml entry, as a block."""
    from blocks.openstack import CredentialsError, OpenStackCredentials

    if config.cloud.credentials_block:
        creds = load_block(
            OpenStackCredentials,
            config.cloud.credentials_block,
            "create it (UI, or OpenStackCredentials.from_clouds_yaml(...).save(...)), or fix "
            "cloud.credentials_block",
        )
    else:
        try:
            creds = OpenStackCredentials.from_clouds_yaml(config.cloud.cloud)
        except CredentialsError as exc:
            raise BootstrapError(str(exc)) from None
        except Exception as exc:
            raise BootstrapError(
                f"no cloud credentials: {str(exc).rstrip('.')}. Name an OpenStackCredentials "
                "block in cloud.credentials_block, or a clouds.yaml entry in cloud.cloud "
                "(or set OS_CLOUD)"
            ) from None
    creds.api_timeout = config.cloud.api_timeout
    return creds


def open_connection(config: BootstrapConfig) -> Connection:
    """A connection through the named OpenStackCredentials block, or the clouds.yaml entry."""
    from blocks.openstack import CredentialsError

    creds = cloud_credentials(config)
    try:
        return creds.get_connection(config.environment)
    except CredentialsError as exc:
        raise BootstrapError(str(exc)) from None


def ours(resource_meta: dict[str, Any] | None, config: BootstrapConfig) -> bool:
    return (resource_meta or {}).get(MARKER) == config.environment


def named_volumes(conn: Connection, config: BootstrapConfig) -> list[Any]:
    # Filtered here: clouds differ in which query filters Cinder allows.
    return [v for v in conn.block_storage.volumes() if v.name == config.volume_name]


def find_ours(items: Any, config: BootstrapConfig, meta: str = "metadata") -> list[Any]:
    return [i for i in items if ours(getattr(i, meta, None), config)]


def our_groups(conn: Connection, config: BootstrapConfig, project_id: str) -> list[Any]:
    """The environment's own security groups (its name, our tag), oldest first, each with its
    rules (Neutron lists them with the group)."""
    groups = conn.network.security_groups(name=config.security_group_name, project_id=project_id)
    return pick_our_groups(list(groups), config)


def pick_our_groups(groups: list[Any], config: BootstrapConfig) -> list[Any]:
    return sorted(
        (g for g in groups if g.name == config.security_group_name and g.description == config.tag),
        key=lambda g: g.created_at or "",
    )


def our_servers(conn: Connection, config: BootstrapConfig) -> list[Any]:
    """The environment's servers (its name, our marker), oldest first."""
    servers = conn.compute.servers(name=f"^{re.escape(config.server_name)}$")
    return sorted(find_ours(servers, config), key=lambda s: s.created_at or "")


def sort_volumes(volumes: list[Any]) -> list[Any]:
    """Attached ones first, then oldest first."""
    return sorted(volumes, key=lambda v: (not v.attachments, v.created_at or ""))


def our_volumes(conn: Connection, config: BootstrapConfig) -> list[Any]:
    return sort_volumes(find_ours(named_volumes(conn, config), config))


def our_floating_ips(conn: Connection, config: BootstrapConfig) -> list[Any]:
    """Addresses carrying our tag, oldest first."""
    ips = conn.network.ips(description=config.tag)
    return sorted(ips, key=lambda f: f.created_at or "")


def first_look() -> bool:
    """Whether a step may act on what preflight observed: on its first attempt, yes (the
    observation is this run's, moments old); a retry reads again, as the failed attempt may
    have changed the world (a create that succeeded before its answer was lost)."""
    from prefect.runtime import task_run

    return task_run.run_count <= 1


def wait_until_active(
    wait: Callable[..., Any], resource: Any, what: str, timeout: float, state: Callable[[Any], str]
) -> Any:
    """openstacksdk's ``wait`` (``wait_for_server``, ``wait_for_status``) for ACTIVE, ERROR
    failing it, polled each second with a progress line ("waiting for WHAT: STATE")."""
    progress = Progress(what)
    return wait(
        resource,
        status="ACTIVE",
        failures=["ERROR"],
        interval=1,
        wait=int(timeout),
        callback=lambda seen: progress.tick(state(seen)),
    )
