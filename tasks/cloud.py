"""Cloud steps on openstacksdk: read what exists, compare with the config, change only what differs.

Every ``ensure_*`` function takes ``apply``: with ``apply=False`` it computes the same decision
and returns the same record without writing (plan mode is this code path, not a second one).
What this tool created is found again by name plus a marker (server and volume metadata, the
floating IP's description), so no state file is kept and a run killed anywhere converges.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from blocks.openstack import find_or_none
from core.config import BootstrapConfig
from core.errors import BootstrapError, PreflightError, retry_transient
from core.log import Progress, logger
from core.records import (
    Action,
    AttachmentRecord,
    FloatingIPRecord,
    KeypairRecord,
    RulesRecord,
    ServerRecord,
    VolumeRecord,
    by_id_path,
)
from tasks.blocks import load_block

if TYPE_CHECKING:
    from openstack.connection import Connection

    from blocks.openstack import OpenStackCredentials
    from blocks.ssh import SSHKeyPair

MARKER = "sails-bootstrap"  # metadata key on servers and volumes we create
#: Volume metadata: the UUID of the filesystem configure made (or found) there. A volume with one
#: is never formatted again, whatever the guest reads on it.
FS_UUID_KEY = "sails-bootstrap-fs-uuid"

# Side-effect steps never cache (a cached "create" would silently skip work); transient errors
# retry with exponential backoff and jitter, permanent ones fail at once.
CLOUD_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}


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


def _ours(resource_meta: dict[str, Any] | None, config: BootstrapConfig) -> bool:
    return (resource_meta or {}).get(MARKER) == config.environment


# -- preflight ---------------------------------------------------------------------------------
@dataclass
class CloudFacts:
    """What preflight found; later steps use these ids instead of looking them up again."""

    project_id: str
    image_id: str
    flavor_id: str
    flavor_vcpus: int
    flavor_ram: int
    network_id: str
    floating_network_id: str
    security_group_id: str
    problems: list[str] = field(default_factory=list)


def _single(items: list[Any], what: str, setting: str, wanted: str | None) -> Any | None:
    if wanted:
        matches = [i for i in items if wanted in (i.name, i.id)]
        if not matches:
            names = ", ".join(sorted(i.name for i in items)) or "none"
            raise LookupError(f"{what} {wanted!r} not found (available: {names}); fix {setting}")
        return matches[0]
    if len(items) == 1:
        return items[0]
    names = ", ".join(sorted(i.name for i in items)) or "none"
    raise LookupError(f"{len(items)} {what}s to choose from ({names}); set {setting}")


@task(name="preflight", **CLOUD_TASK)
def preflight(conn: Connection, config: BootstrapConfig, key: SSHKeyPair) -> CloudFacts:
    """Check credentials, image, flavor, networks, key and quota. Makes no writes.

    The reads run at once, one chain per service (so each service's version discovery happens
    once); quota is read only for what this run would create, so a run that changes nothing
    pays for no quota reads at all."""
    log = logger()
    from keystoneauth1 import exceptions as ks

    try:
        conn.session.get_token()  # keystoneauth's own errors: transient ones are retried
    except (ks.http.Unauthorized, ks.http.Forbidden) as exc:
        raise PreflightError(
            [
                f"the cloud refused the credentials (HTTP {exc.http_status}); fix the "
                "OpenStackCredentials block or the clouds.yaml entry"
            ]
        ) from None
    except (ks.http.NotFound, ks.http.BadRequest) as exc:
        raise PreflightError(
            [
                f"the identity service rejected the request (HTTP {exc.http_status}: "
                f"{exc.message}); check auth_url and the project in the credentials"
            ]
        ) from None
    project_id = str(conn.current_project_id)
    problems: list[str] = []

    def compute() -> tuple[Any, Any, list[Any]]:
        flavor = find_or_none(conn.compute.find_flavor, config.server.flavor)
        keypair = find_or_none(conn.compute.find_keypair, config.keypair_name)
        servers = _find_ours(
            conn.compute.servers(name=f"^{re.escape(config.server_name)}$"), config
        )
        return flavor, keypair, servers

    def network() -> tuple[list[Any], list[Any], list[Any]]:
        groups = conn.network.security_groups(
            name=config.server.security_group, project_id=project_id
        )
        ours = _our_groups(conn, config, project_id)
        return list(conn.network.networks()), list(groups), ours

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="preflight") as pool:
        image_f = pool.submit(find_image, conn, config.server.image)
        compute_f = pool.submit(compute)
        network_f = pool.submit(network)
        volumes_f = pool.submit(lambda: _find_ours(_named_volumes(conn, config), config))
        image, image_problem = image_f.result()
        flavor, existing_kp, servers = compute_f.result()
        networks, groups, access_groups = network_f.result()
        volumes = volumes_f.result()

    if image_problem:
        problems.append(image_problem)
    if flavor is None:
        names = sorted(f.name for f in conn.compute.flavors())
        problems.append(
            f"flavor {config.server.flavor!r} not found; fix server.flavor "
            f"(available: {', '.join(names) or 'none'})"
        )

    internal = [n for n in networks if not n.is_router_external]
    external = [n for n in networks if n.is_router_external]
    network_obj = floating = None
    try:
        network_obj = _single(internal, "project network", "server.network", config.server.network)
    except LookupError as exc:
        problems.append(str(exc))
    try:
        floating = _single(
            external, "external network", "server.floating_network", config.server.floating_network
        )
    except LookupError as exc:
        problems.append(str(exc))

    if not groups:
        problems.append(
            f"security group {config.server.security_group!r} not found in the project; "
            "fix server.security_group"
        )

    live = [v for v in volumes if v.status != "deleting"]
    if len(live) > 1:
        problems.append(duplicate_volumes_problem(live))

    if existing_kp is not None and not _same_key(existing_kp.public_key, key.public_key):
        from blocks.ssh import fingerprint

        problems.append(
            f"keypair {config.keypair_name!r} exists with another public key "
            f"({fingerprint(existing_kp.public_key)}) than the SSHKeyPair block "
            f"{config.ssh.key_block!r} ({key.fingerprint}); delete the keypair in the cloud or "
            "point ssh.key_block at the matching key"
        )

    # Quota: only what this run would add counts, against what the project already uses
    # (a hand-made VM's address and volumes included).
    server = servers[0] if servers else None
    adds = _would_add(config, server, access_groups[0] if access_groups else None)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="preflight-quota") as pool:
        futures = []
        if flavor is not None and server is None:
            futures.append(pool.submit(_compute_quota, conn, flavor))
        if not volumes:
            futures.append(pool.submit(_volume_quota, conn, config))
        if any(adds.values()):
            futures.append(pool.submit(_network_quota, conn, config, project_id, adds, log))
        for future in futures:
            problems.extend(future.result())
    if problems:
        raise PreflightError(problems)
    assert image and flavor and network_obj and floating  # for the type checker
    log.info("preflight passed: image, flavor, networks, security group, keypair and quota")
    return CloudFacts(
        project_id=project_id,
        image_id=image.id,
        flavor_id=flavor.id,
        flavor_vcpus=flavor.vcpus,
        flavor_ram=flavor.ram,
        network_id=network_obj.id,
        floating_network_id=floating.id,
        security_group_id=groups[0].id,
    )


def find_image(conn: Connection, wanted: str) -> tuple[Any | None, str | None]:
    """The image named (or with the id) ``wanted``, else the problem: two images of that name
    (their ids, and the fix: name it by id), or none (with the names that resemble it)."""
    from openstack import exceptions as os_exc

    try:
        image = find_or_none(conn.image.find_image, wanted)
    except os_exc.DuplicateResource:
        same = sorted(conn.image.images(name=wanted), key=lambda i: i.created_at or "")
        listed = "; ".join(
            f"{i.id} ({i.visibility or '?'}, {i.status}, created {i.created_at or '?'})"
            for i in same
        )
        return None, (
            f"{len(same)} images are named {wanted!r}: {listed}. Set server.image to the id of "
            "the one to use"
        )
    if image is not None:
        if image.status != "active":
            return None, (
                f"image {wanted!r} ({image.id}) is {image.status}, not active; choose another "
                "in server.image"
            )
        return image, None
    images = list(conn.image.images())
    similar = similar_image_names(wanted, images)
    hint = (
        f"similar: {', '.join(similar)}"
        if similar
        else f"no image name resembles it among the {len(images)} visible; "
        "`openstack image list` shows them"
    )
    return None, f"image {wanted!r} not found; fix server.image ({hint})"


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[-_.\s]+", name.lower()) if w]


def similar_image_names(wanted: str, images: list[Any], limit: int = 8) -> list[str]:
    """Names of images like ``wanted``: the same first word (``Ubuntu-…``), the same
    ``os_distro`` as those or as that word, or a close spelling; closest first."""
    import difflib

    want = _words(wanted)
    head = want[0] if want else ""
    named = [i for i in images if i.name]
    prefix = {i.id for i in named if _words(i.name)[:1] == [head]}
    distros = {(i.os_distro or "").lower() for i in named if i.id in prefix} | {head}
    distros.discard("")
    scored: dict[str, float] = {}
    for image in named:
        ratio = difflib.SequenceMatcher(None, wanted.lower(), image.name.lower()).ratio()
        related = image.id in prefix or (image.os_distro or "").lower() in distros
        if related or ratio >= 0.75:
            scored[image.name] = max(scored.get(image.name, 0.0), ratio + (1 if related else 0))
    ranked = sorted(scored, key=lambda n: (-scored[n], n))
    if len(ranked) > limit:
        return [*ranked[:limit], f"and {len(ranked) - limit} more"]
    return ranked


def _would_add(config: BootstrapConfig, server: Any | None, group: Any | None) -> dict[str, int]:
    """Neutron resources this run would create: a port with a new server, a floating IP when
    the server has none, the environment's own group when missing (with Neutron's two default
    egress rules) and the ingress rules it lacks."""
    has_fip = server is not None and any(
        a.get("OS-EXT-IPS:type") == "floating"
        for addrs in (server.addresses or {}).values()
        for a in addrs
    )
    wanted = {r.key() for r in config.server.ingress}
    if group is not None:
        have = {
            _rule_key(r) for r in group.security_group_rules or [] if r["direction"] == "ingress"
        }
        rules = len(wanted - have)
    else:
        rules = len(wanted) + 2
    return {
        "port": 0 if server is not None else 1,
        "floatingip": 0 if has_fip else 1,
        "security_group": 0 if group is not None else 1,
        "security_group_rule": rules,
    }


def _over(used: int | None, need: int, limit: int | None) -> bool:
    return limit is not None and limit >= 0 and (used or 0) + need > limit


def _compute_quota(conn: Connection, flavor: Any) -> list[str]:
    limits = conn.compute.get_limits().absolute
    checks = [
        ("instances", 1, limits.instances, limits.instances_used),
        ("vCPUs", flavor.vcpus, limits.total_cores, limits.total_cores_used),
        ("RAM (MB)", flavor.ram, limits.total_ram, limits.total_ram_used),
    ]
    return [
        f"quota: the server needs {need} {what} but {used} of {limit} are in use; "
        "free some or ask for more quota"
        for what, need, limit, used in checks
        if _over(used, need, limit)
    ]


def _volume_quota(conn: Connection, config: BootstrapConfig) -> list[str]:
    limits = conn.block_storage.get_limits().absolute
    out = []
    if _over(limits.total_volumes_used, 1, limits.max_total_volumes):
        out.append(
            f"quota: the volume would be one more but {limits.total_volumes_used} of "
            f"{limits.max_total_volumes} volumes exist (Cinder quota 'volumes'); delete an "
            "unused volume or ask for more quota"
        )
    cap, used = limits.max_total_volume_gigabytes, limits.total_gigabytes_used
    if _over(used, config.volume.size_gb, cap):
        out.append(
            f"quota: the volume needs {config.volume.size_gb} GB but {used} of {cap} GB are "
            "in use (Cinder quota 'gigabytes'); lower volume.size_gb or free volume space"
        )
    return out


def _network_quota(
    conn: Connection, config: BootstrapConfig, project_id: str, adds: dict[str, int], log: Any
) -> list[str]:
    from openstack import exceptions as os_exc

    try:
        quota = conn.network.get_quota(project_id, details=True)
    except (os_exc.ForbiddenException, os_exc.NotFoundException) as exc:
        # A cloud that hides its quota details: Neutron itself refuses what exceeds them.
        log.warning("Neutron quota not checked (HTTP %s)", exc.status_code)
        return []
    fixes = {
        "floatingip": "release an address the project no longer uses (`openstack floating ip "
        "list`; an unattached one can go with `openstack floating ip delete`) or ask for "
        "more quota",
        "port": "delete unused ports or ask for more quota",
        "security_group": "delete an unused security group or ask for more quota",
        "security_group_rule": "remove unused rules (`openstack security group rule list`) or "
        "ask for more quota",
    }
    details = {
        "floatingip": quota.floating_ips,
        "port": quota.ports,
        "security_group": quota.security_groups,
        "security_group_rule": quota.security_group_rules,
    }
    out = []
    for name, need in adds.items():
        d = details[name] or {}
        used, limit = d.get("used"), d.get("limit")
        if not need or not _over(used, need, limit):
            continue
        if name == "floatingip" and any(
            not f.port_id for f in conn.network.ips(description=config.tag)
        ):
            continue  # a free address of ours is reused, nothing allocated
        out.append(
            f"quota: this run would add {need} {name} but the project uses {used} of {limit} "
            f"(Neutron quota '{name}'); {fixes[name]}"
        )
    return out


def _same_key(a: str | None, b: str) -> bool:
    return (a or "").split()[:2] == b.split()[:2]


def _named_volumes(conn: Connection, config: BootstrapConfig) -> list[Any]:
    # Filtered here: clouds differ in which query filters Cinder allows.
    return [v for v in conn.block_storage.volumes() if v.name == config.volume_name]


def _find_ours(items: Any, config: BootstrapConfig, meta: str = "metadata") -> list[Any]:
    return [i for i in items if _ours(getattr(i, meta, None), config)]


# -- keypair -----------------------------------------------------------------------------------
@task(name="ensure-keypair", **CLOUD_TASK)
def ensure_keypair(
    conn: Connection, config: BootstrapConfig, key: SSHKeyPair, apply: bool = True
) -> KeypairRecord:
    from openstack import exceptions as os_exc

    name = config.keypair_name
    existing = find_or_none(conn.compute.find_keypair, name)
    if existing is not None:
        if not _same_key(existing.public_key, key.public_key):
            raise BootstrapError(
                f"keypair {name!r} holds another public key than block {config.ssh.key_block!r} "
                f"({key.fingerprint}); delete it in the cloud or use the matching key"
            )
        return KeypairRecord(name=name, id=name, fingerprint=key.fingerprint, reason="matches")
    record = KeypairRecord(
        name=name,
        id=name,
        action=Action.CREATE,
        applied=apply,
        fingerprint=key.fingerprint,
        reason="missing",
    )
    if apply:
        try:
            conn.compute.create_keypair(name=name, public_key=key.public_key)
        except os_exc.ConflictException:  # created by a concurrent or retried request
            return ensure_keypair.fn(conn, config, key, apply)
        logger().info("imported keypair %s (%s)", name, key.fingerprint)
    return record


# -- security group ----------------------------------------------------------------------------
def _rule_key(rule: Any) -> tuple[str, str, int | None, int | None, str]:
    return (
        rule["ethertype"],
        (rule["protocol"] or "any").lower(),
        rule["port_range_min"],
        rule["port_range_max"],
        rule["remote_ip_prefix"] or ("::/0" if rule["ethertype"] == "IPv6" else "0.0.0.0/0"),
    )


def _describe(key: tuple[str, str, int | None, int | None, str]) -> str:
    _, proto, low, _high, cidr = key
    return f"{proto}{'/' + str(low) if low else ''} from {cidr}"


def _our_groups(conn: Connection, config: BootstrapConfig, project_id: str) -> list[Any]:
    """The environment's own security groups (its name, our tag), oldest first."""
    groups = conn.network.security_groups(name=config.security_group_name, project_id=project_id)
    return sorted(
        (g for g in groups if g.description == config.tag), key=lambda g: g.created_at or ""
    )


def _shared_group_extras(conn: Connection, config: BootstrapConfig, group_id: str) -> list[str]:
    """Ingress rules of the project's shared group that admit more than the config lists (any
    source address, not only the group's own members): the config cannot narrow those."""
    group = conn.network.get_security_group(group_id)
    wanted = {rule.key() for rule in config.server.ingress}
    return sorted(
        _describe(_rule_key(r))
        for r in group.security_group_rules or []
        if r["direction"] == "ingress"
        and not r.get("remote_group_id")
        and _rule_key(r) not in wanted
    )


@task(name="ensure-security-group", **CLOUD_TASK)
def ensure_security_group(
    conn: Connection,
    config: BootstrapConfig,
    project_id: str,
    apply: bool = True,
    shared_group_id: str | None = None,
) -> RulesRecord:
    """The environment's own group holds exactly the configured ingress rules: missing ones are
    added, ones the config no longer lists removed (narrowing a CIDR takes effect). The
    project's shared group (server.security_group) is never touched."""
    from openstack import exceptions as os_exc

    log = logger()
    name = config.security_group_name
    groups = _our_groups(conn, config, project_id)
    wanted = {rule.key(): rule for rule in config.server.ingress}
    if apply:
        for extra in groups[1:]:  # a create retried after it had succeeded
            try:
                conn.network.delete_security_group(extra.id, ignore_missing=True)
                log.warning("deleted duplicate security group %s (%s)", name, extra.id)
            except os_exc.ConflictException:
                log.warning("duplicate security group %s (%s) is in use; kept", name, extra.id)
    created = False
    if groups:
        group = conn.network.get_security_group(groups[0].id)
        rules = [r for r in group.security_group_rules or [] if r["direction"] == "ingress"]
    elif not apply:
        return RulesRecord(
            name=name,
            action=Action.CREATE,
            added=[_describe(k) for k in wanted],
            reason="missing: the group and " + ", ".join(_describe(k) for k in wanted),
            applied=False,
        )
    else:
        group = conn.network.create_security_group(
            name=name,
            description=config.tag,
            project_id=project_id,
        )
        log.info("created security group %s (%s)", name, group.id)
        created, rules = True, []
    have = {_rule_key(r): r for r in rules}
    missing = [k for k in wanted if k not in have]
    extra = [k for k in have if k not in wanted]
    changes = [f"add {_describe(k)}" for k in missing] + [f"remove {_describe(k)}" for k in extra]
    wider = _shared_group_extras(conn, config, shared_group_id) if shared_group_id else []
    note = ""
    if wider:
        note = (
            f"; note: the project's group {config.server.security_group!r} also admits "
            f"{', '.join(wider)} (left as it is: remove those there for the config's rules to be "
            "the whole story)"
        )
        log.warning("security group %s%s", config.server.security_group, note)
    record = RulesRecord(
        name=name,
        id=group.id,
        present=[_describe(k) for k in wanted if k in have],
        added=[_describe(k) for k in missing],
        removed=[_describe(k) for k in extra],
        action=Action.CREATE if created else (Action.CHANGE if changes else Action.KEEP),
        reason=("created; " if created else "")
        + (", ".join(changes) or "all rules as configured")
        + note,
        applied=apply,
    )
    if not apply:
        return record
    for k in missing:
        rule = wanted[k]
        try:
            conn.network.create_security_group_rule(
                security_group_id=group.id,
                direction="ingress",
                ethertype=rule.ethertype,
                protocol=rule.protocol,
                port_range_min=rule.port,
                port_range_max=rule.port,
                remote_ip_prefix=rule.cidr,
                description=rule.description or MARKER,
            )
            log.info("added rule %s to %s", _describe(k), name)
        except os_exc.ConflictException:
            log.info("rule %s already present (409)", _describe(k))
    for k in extra:
        conn.network.delete_security_group_rule(have[k]["id"], ignore_missing=True)
        log.info("removed rule %s from %s (no longer configured)", _describe(k), name)
    return record


# -- server ------------------------------------------------------------------------------------
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


def _our_servers(conn: Connection, config: BootstrapConfig) -> list[Any]:
    servers = conn.compute.servers(name=f"^{re.escape(config.server_name)}$")
    return sorted(_find_ours(servers, config), key=lambda s: s.created_at or "")


def wait_for_server(conn: Connection, server: Any, timeout: float) -> Any:
    progress = Progress(f"server {server.name}")
    deadline = time.monotonic() + timeout
    while True:
        server = conn.compute.get_server(server.id)
        if server.status == "ACTIVE":
            return server
        if server.status == "ERROR":
            fault = (server.fault or {}).get("message", "no fault message")
            raise BootstrapError(
                f"server {server.name} went to ERROR: {fault}. Check the flavor, image and "
                "quota; the failed server was deleted so the next run starts clean"
            )
        if time.monotonic() > deadline:
            from openstack import exceptions as os_exc

            raise os_exc.ResourceTimeout(
                f"server {server.name} still {server.status} after {timeout:.0f} s"
            )
        progress.tick(f"{server.status} ({server.task_state or 'no task'})")
        time.sleep(2)


@task(name="ensure-server", **CLOUD_TASK)
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
    broken, healthy = _sorted_servers(conn, config, apply)
    if healthy:
        server = healthy[0]
        if server.status == "SHUTOFF":
            if apply:
                conn.compute.start_server(server.id)
                server = wait_for_server(conn, server, config.server.build_timeout)
            return _server_record(server, Action.CHANGE, "was SHUTOFF: started", apply)
        if server.status != "ACTIVE" and apply:
            server = wait_for_server(conn, server, config.server.build_timeout)
        reason = "ACTIVE" if server.status == "ACTIVE" else f"{server.status}, not yet ACTIVE"
        if len(healthy) > 1:
            reason += f"; {len(healthy) - 1} duplicate(s) removed"
        joined = {g.get("name") for g in server.security_groups or []}
        if config.security_group_name not in joined:  # a server made before the group existed
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
    reason = "replacing a server in ERROR" if broken else "missing"
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
    _, ours = _sorted_servers(conn, config, apply)
    if ours and ours[0].id != server.id:
        server = wait_for_server(conn, ours[0], config.server.build_timeout)
        return _server_record(server, Action.KEEP, "ACTIVE; a duplicate made meanwhile removed")
    return _server_record(server, Action.CREATE, reason)


def _sorted_servers(
    conn: Connection, config: BootstrapConfig, apply: bool
) -> tuple[list[Any], list[Any]]:
    """Our servers as (in ERROR, the others oldest first). Applying, every one in ERROR and
    every copy but the oldest is deleted (a retried create that had succeeded, or the create
    of an interrupted run that the cloud listed late): the oldest is the one kept."""
    log = logger()
    servers = _our_servers(conn, config)
    broken = [s for s in servers if s.status == "ERROR"]
    healthy = [s for s in servers if s.status != "ERROR"]
    if apply:
        for s in broken:
            log.warning("deleting server %s in ERROR: %s", s.id, (s.fault or {}).get("message"))
            conn.compute.delete_server(s.id, ignore_missing=True)
        for s in healthy[1:]:
            log.warning("deleting duplicate server %s of %s", s.id, s.name)
            conn.compute.delete_server(s.id, ignore_missing=True)
    return broken, healthy


# -- floating IP -------------------------------------------------------------------------------
def _server_port(conn: Connection, server_id: str) -> Any | None:
    ports = list(conn.network.ports(device_id=server_id))
    return ports[0] if ports else None


def wait_for_ip(conn: Connection, fip: Any, timeout: float = 120) -> Any:
    progress = Progress(f"floating IP {fip.floating_ip_address}")
    deadline = time.monotonic() + timeout
    while fip.status != "ACTIVE":
        if time.monotonic() > deadline:
            from openstack import exceptions as os_exc

            raise os_exc.ResourceTimeout(
                f"floating IP {fip.floating_ip_address} still {fip.status} after {timeout:.0f} s"
            )
        progress.tick(fip.status)
        time.sleep(1)
        fip = conn.network.get_ip(fip.id)
    return fip


@task(name="ensure-floating-ip", **CLOUD_TASK)
def ensure_floating_ip(
    conn: Connection,
    config: BootstrapConfig,
    server: ServerRecord,
    facts: CloudFacts | None,
    apply: bool = True,
) -> FloatingIPRecord:
    """The server's floating IP: the one on its port, else one of ours that is free, else new."""
    log = logger()
    ours = sorted(conn.network.ips(description=config.tag), key=lambda f: f.created_at or "")
    port = _server_port(conn, server.id) if server.id else None
    if port is not None:
        on_port = list(conn.network.ips(port_id=port.id))
        if on_port:
            fip = on_port[0]
            if apply and fip.status != "ACTIVE":
                fip = wait_for_ip(conn, fip)
            extras = [f for f in ours if f.id != fip.id and not f.port_id]
            if apply:
                for extra in extras:
                    log.warning(
                        "releasing unused floating IP %s of ours", extra.floating_ip_address
                    )
                    conn.network.delete_ip(extra.id, ignore_missing=True)
            return FloatingIPRecord(
                name=config.server_name,
                id=fip.id,
                address=fip.floating_ip_address,
                reason="attached",
            )
    free = [f for f in ours if not f.port_id]
    if not apply or port is None or facts is None:
        action = Action.CHANGE if free else Action.CREATE
        reason = (
            f"attach free address {free[0].floating_ip_address} of ours"
            if free
            else "allocate and attach"
        )
        return FloatingIPRecord(
            name=config.server_name,
            id=free[0].id if free else None,
            address=free[0].floating_ip_address if free else None,
            action=action,
            reason=reason,
            applied=False,
        )
    if free:
        fip = conn.network.update_ip(free[0].id, port_id=port.id)
        action, reason = Action.CHANGE, "reused a free address of ours"
        for extra in free[1:]:
            log.warning("releasing unused floating IP %s of ours", extra.floating_ip_address)
            conn.network.delete_ip(extra.id, ignore_missing=True)
    else:
        # Allocate unattached first, marked as ours, then attach: a run killed in between
        # leaves an address that the next run finds and reuses instead of leaking it.
        fip = conn.network.create_ip(
            floating_network_id=facts.floating_network_id, description=config.tag
        )
        log.info("allocated floating IP %s", fip.floating_ip_address)
        fip = conn.network.update_ip(fip.id, port_id=port.id)
        action, reason = Action.CREATE, "allocated and attached"
    fip = wait_for_ip(conn, fip)
    log.info("floating IP %s attached to %s", fip.floating_ip_address, server.name)
    return FloatingIPRecord(
        name=config.server_name,
        id=fip.id,
        address=fip.floating_ip_address,
        action=action,
        reason=reason,
    )


# -- volume ------------------------------------------------------------------------------------
def _our_volumes(conn: Connection, config: BootstrapConfig) -> list[Any]:
    vols = _find_ours(_named_volumes(conn, config), config)
    return sorted(vols, key=lambda v: (not v.attachments, v.created_at or ""))


def duplicate_volumes_problem(volumes: list[Any]) -> str:
    """Two volumes of ours: one of them may hold the data, so neither is ever deleted for the
    operator; the problem names both and the fix."""
    listed = "; ".join(
        f"{v.id} ({v.status}, {v.size} GB, created {v.created_at or '?'}"
        + (
            f", attached to {', '.join(a.get('server_id', '?') for a in v.attachments)}"
            if v.attachments
            else ""
        )
        + ")"
        for v in volumes
    )
    return (
        f"{len(volumes)} volumes of this environment are named {volumes[0].name!r}: {listed}. "
        "Volumes are never deleted for you: look inside the one you do not expect (attach it, "
        "`sudo blkid`, mount it read-only), then delete it (`openstack volume delete ID`) or "
        "rename it, and run again"
    )


def wait_for_volume(
    conn: Connection, volume: Any, status: str | tuple[str, ...], timeout: float
) -> Any:
    """The volume once its status is ``status`` (or one of them)."""
    wanted = (status,) if isinstance(status, str) else status
    progress = Progress(f"volume {volume.name} to be {' or '.join(wanted)}")
    deadline = time.monotonic() + timeout
    while True:
        volume = conn.block_storage.get_volume(volume.id)
        if volume.status in wanted:
            return volume
        if volume.status in ("error", "error_attaching", "error_detaching"):
            raise BootstrapError(
                f"volume {volume.name} ({volume.id}) is in status {volume.status}; check the "
                "block storage service and its quota"
            )
        if time.monotonic() > deadline:
            from openstack import exceptions as os_exc

            raise os_exc.ResourceTimeout(
                f"volume {volume.name} still {volume.status} after {timeout:.0f} s"
            )
        progress.tick(volume.status)
        time.sleep(1)


@task(name="ensure-volume", **CLOUD_TASK)
def ensure_volume(conn: Connection, config: BootstrapConfig, apply: bool = True) -> VolumeRecord:
    """The persistent volume. A second one of ours is never deleted: it may hold the data, so
    the run cannot proceed until the operator has looked inside (preflight says so first)."""
    log = logger()
    # A volume being deleted is on its way out (an interrupted teardown): not ours to keep.
    vols = [v for v in _our_volumes(conn, config) if v.status != "deleting"]
    if len(vols) > 1:
        return VolumeRecord(
            name=vols[0].name,
            id=vols[0].id,
            size_gb=vols[0].size,
            status=vols[0].status,
            action=Action.BLOCKED,
            reason=duplicate_volumes_problem(vols),
            applied=apply,
        )
    if vols:
        volume = vols[0]
        if apply and volume.status not in ("available", "in-use"):
            volume = wait_for_volume(conn, volume, "available", config.volume.timeout)
        reason = f"{volume.status}, {volume.size} GB"
        fs_uuid = (volume.metadata or {}).get(FS_UUID_KEY)
        if volume.size < config.volume.size_gb:
            reason += f" (smaller than the {config.volume.size_gb} GB asked; not resized)"
        return VolumeRecord(
            name=volume.name,
            id=volume.id,
            size_gb=volume.size,
            status=volume.status,
            fs_uuid=fs_uuid,
            reason=reason,
            applied=apply,
        )
    if not apply:
        return VolumeRecord(
            name=config.volume_name,
            size_gb=config.volume.size_gb,
            action=Action.CREATE,
            reason="missing",
            applied=False,
        )
    volume = conn.block_storage.create_volume(
        name=config.volume_name,
        size=config.volume.size_gb,
        description=f"Prefect data of {config.environment} (created by {MARKER})",
        metadata={MARKER: config.environment},
    )
    log.info("creating volume %s (%s, %s GB)", volume.name, volume.id, volume.size)
    volume = wait_for_volume(conn, volume, "available", config.volume.timeout)
    return VolumeRecord(
        name=volume.name,
        id=volume.id,
        size_gb=volume.size,
        status=volume.status,
        action=Action.CREATE,
        reason="missing",
    )


@task(name="ensure-attachment", **CLOUD_TASK)
def ensure_attachment(
    conn: Connection,
    config: BootstrapConfig,
    server: ServerRecord,
    volume: VolumeRecord,
    apply: bool = True,
) -> AttachmentRecord:
    base: dict[str, Any] = {
        "name": config.volume_name,
        "server_id": server.id,
        "volume_id": volume.id,
        "device_hint": config.volume.device_hint,
        "device_path": by_id_path(volume.id) if volume.id else None,
    }
    if volume.action == Action.BLOCKED:  # which volume is meant is the operator's call
        return AttachmentRecord(
            **base, action=Action.BLOCKED, reason="the volume cannot be chosen", applied=False
        )
    if not (server.id and volume.id):
        return AttachmentRecord(
            **base, action=Action.CREATE, reason="after creation", applied=False
        )
    current = conn.block_storage.get_volume(volume.id)
    for att in current.attachments or []:
        if att.get("server_id") == server.id:
            return AttachmentRecord(**base, id=att.get("attachment_id"), reason="attached")
    # Cinder lists an attachment once it is complete; Nova's list has it from the request on.
    # A request still in flight (a killed run's, whose server side went on) is waited for.
    pending = _nova_attachment(conn, server.id, volume.id)
    if pending is not None:
        if not apply:
            return AttachmentRecord(**base, id=pending.id, reason=f"attaching ({current.status})")
        wait_for_volume(conn, current, "in-use", config.volume.timeout)
        return AttachmentRecord(**base, id=pending.id, reason="attached (an earlier request)")
    others = [a.get("server_id") for a in current.attachments or []]
    live_others = [s for s in others if find_or_none(conn.compute.find_server, s)]
    if live_others:
        return AttachmentRecord(
            **base,
            action=Action.BLOCKED,
            applied=False,
            reason=f"attached to another server ({', '.join(live_others)}); detach it there first",
        )
    if not apply:
        return AttachmentRecord(**base, action=Action.CREATE, reason="not attached", applied=False)
    if current.status != "available":
        current = wait_for_volume(conn, current, "available", config.volume.timeout)
    att_id = _attach(conn, config, str(server.id), str(server.name), current)
    wait_for_volume(conn, current, "in-use", config.volume.timeout)
    return AttachmentRecord(**base, id=att_id, action=Action.CREATE, reason="attached now")


def _attach(
    conn: Connection, config: BootstrapConfig, server_id: str, server_name: str, volume: Any
) -> str:
    """Ask Nova to attach; the attachment's id. Where another request (a killed run's) got
    there between our read and ours, that one is taken: Nova lists it from its request on,
    but Cinder may hold the volume reserved a moment before Nova shows the request, or after
    Nova gave it up. So the volume is let settle, and then either Nova lists the other
    request, or the volume is free and ours is made again."""
    from openstack import exceptions as os_exc

    def request() -> str:
        att = conn.compute.create_volume_attachment(
            server_id, volume=volume.id, device=config.volume.device_hint
        )
        logger().info("attaching volume %s to %s", volume.name, server_name)
        return str(att.id)

    try:
        return request()
    except os_exc.BadRequestException:
        earlier = _nova_attachment(conn, server_id, volume.id)
        if earlier is None:
            settled = wait_for_volume(conn, volume, ("available", "in-use"), config.volume.timeout)
            earlier = _nova_attachment(conn, server_id, volume.id)
            if earlier is None and settled.status == "available":
                return request()  # the other request gave up
            if earlier is None:
                raise
        logger().info("volume %s: an earlier attach request is completing", volume.name)
        return str(earlier.id)


def _nova_attachment(conn: Connection, server_id: str, volume_id: str) -> Any | None:
    """The server's attachment of this volume as Nova lists it (requested or complete)."""
    for att in conn.compute.volume_attachments(server_id):
        if att.volume_id == volume_id:
            return att
    return None


@task(name="console-fingerprints", **CLOUD_TASK)
def console_fingerprints(conn: Connection, server_id: str, wait: float = 60) -> list[str]:
    """SSH host key fingerprints the server printed on its console (cloud-init's block).

    cloud-init prints them in its final stage, a minute or more after Nova says ACTIVE on a real
    cloud: the console is read again until they appear, up to ``wait`` seconds after the server
    was launched (one read for a server launched longer ago, or with ``wait=0``). The wait ends
    early once cloud-init says it finished without printing them (an image configured not to)."""
    since = _seconds_since_launch(conn, server_id) if wait > 0 else 0.0
    deadline = time.monotonic() + max(0.0, wait - since)
    progress = Progress(f"the host key fingerprints on server {server_id[:8]}'s console")
    while True:
        output = conn.compute.get_server_console_output(server_id).get("output") or ""
        found = parse_fingerprints(output)
        if found or time.monotonic() > deadline:
            return found
        if CLOUD_INIT_FINISHED.search(output):
            return []
        progress.tick("not printed yet (cloud-init's final stage prints them)")
        time.sleep(3)


def _seconds_since_launch(conn: Connection, server_id: str) -> float:
    """Seconds since Nova launched the server (0 when it does not say)."""
    from datetime import UTC, datetime

    launched = getattr(conn.compute.get_server(server_id), "launched_at", None)
    if not launched:
        return 0.0
    try:
        when = datetime.fromisoformat(str(launched).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # Nova's launched_at is UTC without an offset
    return max(0.0, (datetime.now(UTC) - when).total_seconds())


#: cloud-init's last line on the console ("Cloud-init v. 24.1 finished at ...").
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at")
_HOST_KEY_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY (FINGERPRINTS|KEYS)-----(.*?)-----END SSH HOST KEY \1-----", re.S
)
# ssh-keygen -l: "256 SHA256:<43 base64 characters> root@host (ED25519)".
_SHA256 = re.compile(r"\bSHA256:([A-Za-z0-9+/]{43})(?![A-Za-z0-9+/])")
_PUBLIC_KEY = re.compile(
    r"\b((?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)) AAAA[A-Za-z0-9+/]+={0,2})"
)


def parse_fingerprints(console: str) -> list[str]:
    """The host key fingerprints in a console log, from the last complete block cloud-init
    printed (``-----BEGIN SSH HOST KEY FINGERPRINTS-----``; its lines may carry a syslog
    prefix such as ``<14>Dec  2 15:00:00 ec2:`` and other output may be interleaved). Without
    one, they are computed from the ``-----BEGIN SSH HOST KEY KEYS-----`` block. Everything
    else (the ``ci-info`` tables of the user's authorized keys, a block cut off by the
    console's size limit) is ignored."""
    from blocks.ssh import fingerprint

    text = console.replace("\r", "")
    last: dict[str, str] = {}
    for match in _HOST_KEY_BLOCK.finditer(text):
        last[match.group(1)] = match.group(2)
    found = [f"SHA256:{m}" for m in _SHA256.findall(last.get("FINGERPRINTS", ""))]
    if not found:
        found = []
        for key in _PUBLIC_KEY.findall(last.get("KEYS", "")):
            try:
                found.append(fingerprint(key))
            except ValueError:
                continue
    return list(dict.fromkeys(found))


# -- teardown ----------------------------------------------------------------------------------
@task(name="delete-server", **CLOUD_TASK)
def delete_server(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[ServerRecord]:
    out = []
    for server in _our_servers(conn, config):
        out.append(_server_record(server, Action.DELETE, "teardown", apply))
        if apply:
            conn.compute.delete_server(server.id, ignore_missing=True)
            conn.compute.wait_for_delete(server, interval=1, wait=config.server.build_timeout)
            logger().info("deleted server %s", server.id)
    return out


@task(name="delete-security-group", **CLOUD_TASK)
def delete_security_group(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[RulesRecord]:
    """The environment's own group, once no port uses it (Neutron frees a deleted server's
    port a moment after the server is gone: a 409 meanwhile is waited out)."""
    from openstack import exceptions as os_exc

    out = []
    for group in _our_groups(conn, config, str(conn.current_project_id)):
        out.append(
            RulesRecord(
                name=group.name, id=group.id, action=Action.DELETE, reason="teardown", applied=apply
            )
        )
        if not apply:
            continue
        deadline = time.monotonic() + 60
        while True:
            try:
                conn.network.delete_security_group(group.id, ignore_missing=True)
                logger().info("deleted security group %s", group.name)
                break
            except os_exc.ConflictException:
                if time.monotonic() > deadline:
                    raise BootstrapError(
                        f"security group {group.name} ({group.id}) is still in use; delete the "
                        "ports that use it, then run down again"
                    ) from None
                time.sleep(1)
    return out


@task(name="release-floating-ips", **CLOUD_TASK)
def release_floating_ips(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[FloatingIPRecord]:
    out = []
    for fip in conn.network.ips(description=config.tag):
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


@task(name="delete-volume", **CLOUD_TASK)
def delete_volume(
    conn: Connection, config: BootstrapConfig, apply: bool = True, only: str | None = None
) -> list[VolumeRecord]:
    """The environment's volume (``only``: just the one with that id)."""
    out = []
    vols = [v for v in _our_volumes(conn, config) if only is None or v.id == only]
    for vol in vols:
        deleting = vol.status == "deleting"
        out.append(
            VolumeRecord(
                name=vol.name,
                id=vol.id,
                size_gb=vol.size,
                status=vol.status,
                action=Action.DELETE,
                reason="already being deleted" if deleting else "teardown --delete-volume",
                applied=apply,
            )
        )
        if apply and not deleting:
            if vol.status != "available":
                wait_for_volume(conn, vol, "available", config.volume.timeout)
            conn.block_storage.delete_volume(vol.id, ignore_missing=True)
    if apply:
        # Cinder deletes in the background: done means gone, so a re-run or a new volume of the
        # same name never meets a half-deleted one.
        for vol in vols:
            conn.block_storage.wait_for_delete(vol, interval=1, wait=int(config.volume.timeout))
            logger().info("deleted volume %s", vol.id)
    return out


def our_volume_ids(config: BootstrapConfig) -> list[str]:
    """The ids of the environment's volumes, for an operator to confirm one by typing it."""
    conn = open_connection(config)
    try:
        return [v.id for v in _our_volumes(conn, config) if v.status != "deleting"]
    finally:
        conn.close()


# -- locating the VM (read-only) ---------------------------------------------------------------
@dataclass
class VMTarget:
    """Where the VM is, as the cloud says: what the configure and health flows need."""

    server_id: str
    address: str
    volume_id: str | None
    host_keys: list[str]
    status: str
    fs_uuid: str | None = None  # recorded on the volume (FS_UUID_KEY)


@task(name="locate-vm", **CLOUD_TASK)
def locate_vm(conn: Connection, config: BootstrapConfig) -> VMTarget:
    """Find this environment's server, floating IP and volume. Makes no writes."""
    servers = [s for s in _our_servers(conn, config) if s.status != "ERROR"]
    if not servers:
        raise BootstrapError(
            f"no server {config.server_name!r} of environment {config.environment!r}; "
            "run `sails-bootstrap provision` first"
        )
    server = servers[0]
    port = _server_port(conn, server.id)
    fips = list(conn.network.ips(port_id=port.id)) if port is not None else []
    if not fips:
        raise BootstrapError(
            f"server {server.name} has no floating IP; run `sails-bootstrap provision`"
        )
    volumes = [
        v
        for v in _our_volumes(conn, config)
        if any(a.get("server_id") == server.id for a in v.attachments or [])
    ]
    return VMTarget(
        server_id=server.id,
        address=fips[0].floating_ip_address,
        volume_id=volumes[0].id if volumes else None,
        host_keys=console_fingerprints.fn(conn, server.id, wait=0),
        status=server.status,
        fs_uuid=(volumes[0].metadata or {}).get(FS_UUID_KEY) if volumes else None,
    )


@task(name="record-filesystem", **CLOUD_TASK)
def record_fs_uuid(conn: Connection, volume_id: str, uuid: str) -> None:
    """Write the data filesystem's UUID on the volume (one metadata key, nothing else touched)."""
    conn.block_storage.set_volume_metadata(volume_id, **{FS_UUID_KEY: uuid})
    logger().info("recorded filesystem %s on volume %s", uuid, volume_id)
