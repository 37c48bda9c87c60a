"""The server: found by name and marker, booted when missing, waited for until ACTIVE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import (
    Action,
    RulesRecord,
    ServerRecord,
)
from tasks.cloud import MARKER, first_look, our_servers, wait_until_active
from tasks.cloud.facts import CloudFacts

if TYPE_CHECKING:
    from openstack.connection import Connection


def _fixed_ip(server: Any) -> str | None:
    for addresses in (server.addresses or {}).values():
        for addr in addresses:
            if addr.get("OS-EXT-IPS:type") == "fixed" and addr.get("version") == 4:
                return addr["addr"]
    return None


def _server_record(server: Any, action: Action, reason: str, apply: bool = True) -> ServerRecord:
    return ServerRecord(
        name=server.name,
        id=server.id,
        status=server.status,
        fixed_ip=_fixed_ip(server),
        floating_ips=[
            a["addr"]
            for addrs in (server.addresses or {}).values()
            for a in addrs
            if a.get("OS-EXT-IPS:type") == "floating"
        ],
        action=action,
        reason=reason,
        applied=apply,
        created=action == Action.CREATE,
        launched_at=getattr(server, "launched_at", None),
    )


def boot_time_left(server: ServerRecord, boot_timeout: float) -> float:
    """How much of the boot bound a server launched at ``server.launched_at`` may still be
    booting for: all of it when not known; none for a server up longer than that."""
    import datetime as dt

    if not server.launched_at:
        return boot_timeout
    try:
        launched = dt.datetime.fromisoformat(server.launched_at)
    except ValueError:
        return boot_timeout
    if launched.tzinfo is None:
        launched = launched.replace(tzinfo=dt.UTC)
    age = (dt.datetime.now(dt.UTC) - launched).total_seconds()
    return max(0.0, boot_timeout - age)


def wait_for_server(conn: Connection, server: Any, timeout: float) -> Any:
    """The server once ACTIVE (openstacksdk's wait); one gone to ERROR fails with Nova's fault."""
    from openstack import exceptions as os_exc

    try:
        return wait_until_active(
            conn.compute.wait_for_server,
            server,
            f"server {server.name}",
            timeout,
            lambda pct: f"building ({pct}%)",
        )
    except os_exc.ResourceFailure:
        failed = conn.compute.get_server(server.id)
        fault = (failed.fault or {}).get("message", "no fault message")
        raise BootstrapError(
            f"server {failed.name} went to ERROR: {fault}. Check the flavor, image and "
            "quota; the failed server was deleted so the next run starts clean"
        ) from None


@dataclass(frozen=True)
class ServerDecision:
    """Which of our servers is kept (the oldest not in ERROR), which go (every one in ERROR,
    every later copy: a retried create that had succeeded, or an interrupted run's), and what
    the kept one needs: a start (SHUTOFF), the environment's group (a server made before the
    group existed). No server to keep: CREATE."""

    keep: Any | None
    delete: list[Any]
    start: bool = False
    join_group: bool = False
    replacing: bool = False

    @property
    def action(self) -> Action:
        if self.keep is None:
            return Action.CREATE
        return Action.CHANGE if self.start or self.join_group else Action.KEEP


def needs_group(server: Any, group_name: str) -> bool:
    """An ACTIVE server not in the environment's group (one made before the group existed).
    A server still building lists no groups yet: it is judged once ACTIVE."""
    joined = {g.get("name") for g in server.security_groups or []}
    return server.status == "ACTIVE" and group_name not in joined


def decide_server(servers: list[Any], group_name: str) -> ServerDecision:
    """``servers``: ours, oldest first, each with ``status`` and ``security_groups``."""
    broken = [s for s in servers if s.status == "ERROR"]
    healthy = [s for s in servers if s.status != "ERROR"]
    if not healthy:
        return ServerDecision(keep=None, delete=broken, replacing=bool(broken))
    keep = healthy[0]
    return ServerDecision(
        keep=keep,
        delete=broken + healthy[1:],
        start=keep.status == "SHUTOFF",
        join_group=needs_group(keep, group_name),
    )


def _delete_others(conn: Connection, decision: ServerDecision) -> None:
    log = logger()
    for s in decision.delete:
        if s.status == "ERROR":
            log.warning("deleting server %s in ERROR: %s", s.id, (s.fault or {}).get("message"))
        else:
            log.warning("deleting duplicate server %s of %s", s.id, s.name)
        conn.compute.delete_server(s.id, ignore_missing=True)


def ensure_server(
    conn: Connection,
    config: BootstrapConfig,
    facts: CloudFacts | None,
    apply: bool = True,
    access: RulesRecord | None = None,
) -> ServerRecord:
    """One server of ours, ACTIVE, in the project's shared group and the environment's own
    (``access``). Extra copies of ours are deleted; ERROR ones replaced."""
    log = logger()
    servers = facts.servers if facts is not None and first_look() else our_servers(conn, config)
    decision = decide_server(servers, config.security_group_name)
    if apply:
        _delete_others(conn, decision)
    server = decision.keep
    if server is not None:
        if decision.start:
            if apply:
                conn.compute.start_server(server.id)
                server = wait_for_server(conn, server, config.server.build_timeout)
            return _server_record(server, Action.CHANGE, "was SHUTOFF: started", apply)
        join_group = decision.join_group
        if server.status != "ACTIVE" and apply:
            server = wait_for_server(conn, server, config.server.build_timeout)
            join_group = needs_group(server, config.security_group_name)
        reason = "ACTIVE" if server.status == "ACTIVE" else f"{server.status}, not yet ACTIVE"
        duplicates = [s for s in decision.delete if s.status != "ERROR"]
        if duplicates:
            reason += f"; {len(duplicates)} duplicate(s) removed"
        if join_group:
            if apply and access is not None and access.id:
                conn.compute.add_security_group_to_server(server, access.id)
                log.info("server %s joined security group %s", server.name, access.name)
            return _server_record(
                server,
                Action.CHANGE,
                f"{reason}; join security group {config.security_group_name}",
                apply,
            )
        return _server_record(server, Action.KEEP, reason, apply)
    reason = "replacing a server in ERROR" if decision.replacing else "missing"
    if not apply or facts is None:
        return ServerRecord(
            name=config.server_name, action=Action.CREATE, reason=reason, applied=False
        )
    server = conn.compute.create_server(
        name=config.server_name,
        image_id=facts.image_id,
        flavor_id=facts.flavor_id,
        networks=[{"uuid": facts.network_id}],
        key_name=config.keypair_name,
        security_groups=[
            {"name": facts.security_group_id},
            *([{"name": access.id}] if access is not None and access.id else []),
        ],
        metadata={MARKER: config.environment},
    )
    log.info("creating server %s (%s)", config.server_name, server.id)
    try:
        server = wait_for_server(conn, server, config.server.build_timeout)
    except BootstrapError:
        conn.compute.delete_server(server.id, ignore_missing=True)
        raise
    # A run killed while its create was in flight: the cloud may list that server only after
    # this run looked. Keep the oldest, as the next run would, so nothing is left twice.
    again = decide_server(our_servers(conn, config), config.security_group_name)
    _delete_others(conn, again)
    if again.keep is not None and again.keep.id != server.id:
        server = wait_for_server(conn, again.keep, config.server.build_timeout)
        return _server_record(server, Action.KEEP, "ACTIVE; a duplicate made meanwhile removed")
    return _server_record(server, Action.CREATE, reason)


def delete_server(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[ServerRecord]:
    out = []
    for server in our_servers(conn, config):
        out.append(_server_record(server, Action.DELETE, "teardown", apply))
        if apply:
            conn.compute.delete_server(server.id, ignore_missing=True)
            conn.compute.wait_for_delete(server, interval=1, wait=config.server.build_timeout)
            logger().info("deleted server %s", server.id)
    return out
