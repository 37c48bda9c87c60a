"""The floating IP: ours by its description, allocated once and bound to the server's port."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import BootstrapConfig
from core.log import logger
from core.records import (
    Action,
    FloatingIPRecord,
    ServerRecord,
)
from tasks.cloud import first_look, our_floating_ips, wait_until_active
from tasks.cloud.facts import CloudFacts

if TYPE_CHECKING:
    from openstack.connection import Connection


def server_port(conn: Connection, server_id: str) -> Any | None:
    ports = list(conn.network.ports(device_id=server_id))
    return ports[0] if ports else None


def wait_for_ip(conn: Connection, fip: Any, timeout: float = 120) -> Any:
    """The address once Neutron says ACTIVE (openstacksdk's wait)."""
    return wait_until_active(
        conn.network.wait_for_status,
        fip,
        f"floating IP {fip.floating_ip_address}",
        timeout,
        lambda _: "not yet ACTIVE",
    )


@dataclass(frozen=True)
class FloatingIPDecision:
    """KEEP the address on the server's port, else CHANGE: attach a free one of ours, else
    CREATE: allocate one; ``release`` are free addresses of ours beyond the one used (a retried
    allocation's leftovers)."""

    action: Action
    use: Any | None
    release: list[Any]


def decide_floating_ip(on_port: Any | None, ours: list[Any]) -> FloatingIPDecision:
    """``on_port``: the address bound to the server's port, if any; ``ours``: every address
    carrying our tag, oldest first (bound ones have a ``port_id``)."""
    if on_port is not None:
        spare = [f for f in ours if f.id != on_port.id and not f.port_id]
        return FloatingIPDecision(Action.KEEP, on_port, spare)
    free = [f for f in ours if not f.port_id]
    if free:
        return FloatingIPDecision(Action.CHANGE, free[0], free[1:])
    return FloatingIPDecision(Action.CREATE, None, [])


def reserve_floating_ip(
    conn: Connection, config: BootstrapConfig, facts: CloudFacts, apply: bool = True
) -> FloatingIPRecord | None:
    """An address of ours, allocated while the server builds when there is none at all (not
    yet attached: a run killed before the attach leaves it for the next run to reuse, marked
    as ours). None when one of ours exists already, or in plan mode."""
    ours = facts.floating_ips if first_look() else our_floating_ips(conn, config)
    if ours or not apply:
        return None
    fip = conn.network.create_ip(
        floating_network_id=facts.floating_network_id, description=config.tag
    )
    logger().info("allocated floating IP %s", fip.floating_ip_address)
    return FloatingIPRecord(
        name=config.server_name,
        id=fip.id,
        address=fip.floating_ip_address,
        action=Action.CREATE,
        reason="allocated",
    )


def bound_to_server(server: ServerRecord, ours: list[Any]) -> Any | None:
    """Ours, bound to a port and listed by Nova among the server's addresses: the server's."""
    listed = set(server.floating_ips)
    return next((f for f in ours if f.port_id and f.floating_ip_address in listed), None)


def ensure_floating_ip(
    conn: Connection,
    config: BootstrapConfig,
    server: ServerRecord,
    facts: CloudFacts | None,
    reserved: FloatingIPRecord | None = None,
    apply: bool = True,
) -> FloatingIPRecord:
    """The server's floating IP: the one on its port, else one of ours that is free (the one
    ``reserve_floating_ip`` allocated while the server built), else new."""
    log = logger()
    if facts is not None and reserved is None and first_look():
        ours = facts.floating_ips
    else:
        ours = our_floating_ips(conn, config)
    on_port = bound_to_server(server, ours)
    port = None
    if on_port is None and server.id:
        port = server_port(conn, server.id)
        on_port = next(iter(conn.network.ips(port_id=port.id)), None) if port else None
    decision = decide_floating_ip(on_port, ours)

    def release_spares() -> None:
        for extra in decision.release:
            log.warning("releasing unused floating IP %s of ours", extra.floating_ip_address)
            conn.network.delete_ip(extra.id, ignore_missing=True)

    if on_port is not None:  # KEEP
        fip = on_port
        if apply:
            if fip.status != "ACTIVE":
                fip = wait_for_ip(conn, fip)
            release_spares()
        return FloatingIPRecord(
            name=config.server_name, id=fip.id, address=fip.floating_ip_address, reason="attached"
        )
    use = decision.use
    if not apply or port is None or facts is None:
        return FloatingIPRecord(
            name=config.server_name,
            id=use.id if use else None,
            address=use.floating_ip_address if use else None,
            action=decision.action,
            reason=(
                f"attach free address {use.floating_ip_address} of ours"
                if use
                else "allocate and attach"
            ),
            applied=False,
        )
    release_spares()
    action = decision.action
    if use is not None:
        fip = conn.network.update_ip(use.id, port_id=port.id)
        if reserved is not None and reserved.id == use.id:
            action, reason = Action.CREATE, "allocated while the server built, and attached"
        else:
            reason = "reused a free address of ours"
    else:
        # Allocate unattached first, marked as ours, then attach: a run killed in between
        # leaves an address that the next run finds and reuses instead of leaking it.
        fip = conn.network.create_ip(
            floating_network_id=facts.floating_network_id, description=config.tag
        )
        log.info("allocated floating IP %s", fip.floating_ip_address)
        fip = conn.network.update_ip(fip.id, port_id=port.id)
        reason = "allocated and attached"
    fip = wait_for_ip(conn, fip)
    log.info("floating IP %s attached to %s", fip.floating_ip_address, server.name)
    return FloatingIPRecord(
        name=config.server_name,
        id=fip.id,
        address=fip.floating_ip_address,
        action=action,
        reason=reason,
    )


def release_floating_ips(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[FloatingIPRecord]:
    out = []
    for fip in our_floating_ips(conn, config):
        out.append(
            FloatingIPRecord(
                name=config.server_name,
                id=fip.id,
                address=fip.floating_ip_address,
                action=Action.DELETE,
                reason="teardown",
                applied=apply,
            )
        )
        if apply:
            conn.network.delete_ip(fip.id, ignore_missing=True)
            logger().info("released floating IP %s", fip.floating_ip_address)
    return out
