"""Read-only checks before anything is touched: image, flavor, networks, quotas, a keypair that
matches, what already exists. Each problem names the setting to fix."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blocks.openstack import find_or_none
from core.config import BootstrapConfig
from core.errors import PreflightError
from core.log import logger
from tasks.cloud import (
    our_floating_ips,
    our_servers,
    our_volumes,
    pick_our_groups,
)
from tasks.cloud.facts import CloudFacts
from tasks.cloud.keypair import same_key
from tasks.cloud.secgroup import rule_key
from tasks.cloud.volume import duplicate_volumes_problem

if TYPE_CHECKING:
    from openstack.connection import Connection

    from blocks.ssh import SSHKeyPair


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

    def compute() -> tuple[list[Any], Any, list[Any]]:
        # Listing the flavors is one call where find_flavor by name is two (a 404 by id first).
        flavors = list(conn.compute.flavors())
        keypair = find_or_none(conn.compute.find_keypair, config.keypair_name)
        return flavors, keypair, our_servers(conn, config)

    def network() -> tuple[list[Any], list[Any], list[Any]]:
        # One listing holds the shared group and the environment's own, with their rules.
        groups = list(conn.network.security_groups(project_id=project_id))
        return list(conn.network.networks()), groups, our_floating_ips(conn, config)

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="preflight") as pool:
        image_f = pool.submit(find_image, conn, config.server.image)
        compute_f = pool.submit(compute)
        network_f = pool.submit(network)
        volumes_f = pool.submit(lambda: our_volumes(conn, config))
        image, image_problem = image_f.result()
        flavors, existing_kp, servers = compute_f.result()
        networks, project_groups, floating_ips = network_f.result()
        volumes = volumes_f.result()
    wanted_flavor = config.server.flavor
    flavor = next((f for f in flavors if f.id == wanted_flavor), None) or next(
        (f for f in flavors if f.name == wanted_flavor), None
    )
    groups = [g for g in project_groups if g.name == config.server.security_group]
    access_groups = pick_our_groups(project_groups, config)

    if image_problem:
        problems.append(image_problem)
    if flavor is None:
        names = sorted(f.name for f in flavors)
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

    if existing_kp is not None and not same_key(existing_kp.public_key, key.public_key):
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
    adds = would_add(config, server, access_groups[0] if access_groups else None, floating_ips)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="preflight-quota") as pool:
        futures = []
        if flavor is not None and server is None:
            futures.append(pool.submit(_compute_quota, conn, flavor))
        if not volumes:
            futures.append(pool.submit(_volume_quota, conn, config))
        if any(adds.values()):
            futures.append(pool.submit(_network_quota, conn, project_id, adds, floating_ips, log))
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
        keypair=existing_kp,
        servers=servers,
        access_groups=access_groups,
        volumes=volumes,
        floating_ips=floating_ips,
        shared_group=groups[0],
    )


def find_image(conn: Connection, wanted: str) -> tuple[Any | None, str | None]:
    """The image named (or with the id) ``wanted``, else the problem: two images of that name
    (their ids, and the fix: name it by id), or none (with the names that resemble it).
    One read: by id when ``wanted`` is a UUID, else the images of that name."""
    import uuid

    try:
        uuid.UUID(wanted)
        by_id = True
    except ValueError:
        by_id = False
    image = find_or_none(conn.image.find_image, wanted) if by_id else None
    if image is None:
        same = sorted(conn.image.images(name=wanted), key=lambda i: i.created_at or "")
        if len(same) > 1:
            listed = "; ".join(
                f"{i.id} ({i.visibility or '?'}, {i.status}, created {i.created_at or '?'})"
                for i in same
            )
            return None, (
                f"{len(same)} images are named {wanted!r}: {listed}. Set server.image to the id "
                "of the one to use"
            )
        image = same[0] if same else None
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


def would_add(
    config: BootstrapConfig, server: Any | None, group: Any | None, floating_ips: list[Any]
) -> dict[str, int]:
    """Neutron resources this run would create: a port with a new server, a floating IP when
    the server has none, the environment's own group when missing (with Neutron's two default
    egress rules) and the ingress rules it lacks. The server has an address when Nova lists
    one or when one of ours (``floating_ips``) is bound: Nova's list of a server's addresses
    follows Neutron's only after a moment."""
    nova_lists_one = server is not None and any(
        a.get("OS-EXT-IPS:type") == "floating"
        for addrs in (server.addresses or {}).values()
        for a in addrs
    )
    has_fip = server is not None and (nova_lists_one or any(f.port_id for f in floating_ips))
    wanted = {r.key() for r in config.server.ingress}
    if group is not None:
        have = {
            rule_key(r) for r in group.security_group_rules or [] if r["direction"] == "ingress"
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
    conn: Connection, project_id: str, adds: dict[str, int], floating_ips: list[Any], log: Any
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
        if name == "floatingip" and any(not f.port_id for f in floating_ips):
            continue  # a free address of ours is reused, nothing allocated
        out.append(
            f"quota: this run would add {need} {name} but the project uses {used} of {limit} "
            f"(Neutron quota '{name}'); {fixes[name]}"
        )
    return out
