"""The environment's own security group holding exactly the configured ingress rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.poll import poll
from core.records import (
    Action,
    RulesRecord,
)
from tasks.cloud import MARKER, first_look, our_groups
from tasks.cloud.facts import CloudFacts

if TYPE_CHECKING:
    from openstack.connection import Connection


#: A rule as the cloud and the config both describe it: (ethertype, protocol, port from, port to,
#: source CIDR).
RuleKey = tuple[str, str, int | None, int | None, str]


def rule_key(rule: Any) -> RuleKey:
    return (
        rule["ethertype"],
        (rule["protocol"] or "any").lower(),
        rule["port_range_min"],
        rule["port_range_max"],
        rule["remote_ip_prefix"] or ("::/0" if rule["ethertype"] == "IPv6" else "0.0.0.0/0"),
    )


def describe_key(key: RuleKey) -> str:
    _, proto, low, _high, cidr = key
    return f"{proto}{'/' + str(low) if low else ''} from {cidr}"


@dataclass(frozen=True)
class RuleChanges:
    """The decision for the group's ingress rules: which stay, which are added, which go."""

    present: list[RuleKey]
    missing: list[RuleKey]
    extra: list[RuleKey]

    def action(self, group_exists: bool) -> Action:
        if not group_exists:
            return Action.CREATE
        return Action.CHANGE if self.missing or self.extra else Action.KEEP

    def reason(self) -> str:
        changes = [f"add {describe_key(k)}" for k in self.missing]
        changes += [f"remove {describe_key(k)}" for k in self.extra]
        return ", ".join(changes) or "all rules as configured"


def decide_rules(wanted: list[RuleKey], have: list[RuleKey]) -> RuleChanges:
    """Exactly the configured rules (in the config's order): the missing ones added, any the
    config does not list removed, whatever the cloud's order or duplicates."""
    have_set, wanted_set = set(have), set(wanted)
    return RuleChanges(
        present=[k for k in wanted if k in have_set],
        missing=[k for k in wanted if k not in have_set],
        extra=sorted(set(have) - wanted_set, key=describe_key),
    )


def _shared_group_extras(config: BootstrapConfig, group: Any) -> list[str]:
    """Ingress rules of the project's shared group that admit more than the config lists (any
    source address, not only the group's own members): the config cannot narrow those."""
    wanted = {rule.key() for rule in config.server.ingress}
    return sorted(
        describe_key(rule_key(r))
        for r in group.security_group_rules or []
        if r["direction"] == "ingress"
        and not r.get("remote_group_id")
        and rule_key(r) not in wanted
    )


def ensure_security_group(
    conn: Connection, config: BootstrapConfig, facts: CloudFacts, apply: bool = True
) -> RulesRecord:
    """The environment's own group holds exactly the configured ingress rules: missing ones are
    added, ones the config no longer lists removed (narrowing a CIDR takes effect). The
    project's shared group (server.security_group) is never touched."""
    from openstack import exceptions as os_exc

    log = logger()
    name = config.security_group_name
    project_id = facts.project_id
    seen = first_look()
    groups = facts.access_groups if seen else our_groups(conn, config, project_id)
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
        group = groups[0]  # listed with its rules
        rules = [r for r in group.security_group_rules or [] if r["direction"] == "ingress"]
    elif not apply:
        return RulesRecord(
            name=name,
            action=Action.CREATE,
            added=[describe_key(k) for k in wanted],
            reason="missing: the group and " + ", ".join(describe_key(k) for k in wanted),
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
    have = {rule_key(r): r for r in rules}
    decision = decide_rules(list(wanted), list(have))
    shared = facts.shared_group
    if not seen or shared is None:
        shared = conn.network.get_security_group(facts.security_group_id)
    wider = _shared_group_extras(config, shared)
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
        present=[describe_key(k) for k in decision.present],
        added=[describe_key(k) for k in decision.missing],
        removed=[describe_key(k) for k in decision.extra],
        action=decision.action(group_exists=not created),
        reason=("created; " if created else "") + decision.reason() + note,
        applied=apply,
    )
    if not apply:
        return record
    for k in decision.missing:
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
            log.info("added rule %s to %s", describe_key(k), name)
        except os_exc.ConflictException:
            log.info("rule %s already present (409)", describe_key(k))
    for k in decision.extra:
        conn.network.delete_security_group_rule(have[k]["id"], ignore_missing=True)
        log.info("removed rule %s from %s (no longer configured)", describe_key(k), name)
    return record


def _delete_when_free(conn: Connection, group: Any) -> None:
    """Delete the group, waiting out the 409 of a port Neutron frees a moment after its
    server is gone."""
    from openstack import exceptions as os_exc

    def delete() -> bool:
        try:
            conn.network.delete_security_group(group.id, ignore_missing=True)
            return True
        except os_exc.ConflictException:
            return False

    poll(
        delete,
        bool,
        f"security group {group.name} to be free",
        60,
        interval=1,
        state=lambda _: "in use",
        timed_out=lambda _: BootstrapError(
            f"security group {group.name} ({group.id}) is still in use; delete the ports "
            "that use it, then run down again"
        ),
    )


def delete_security_group(
    conn: Connection, config: BootstrapConfig, apply: bool = True
) -> list[RulesRecord]:
    """The environment's own group, once no port uses it (Neutron frees a deleted server's
    port a moment after the server is gone: a 409 meanwhile is waited out)."""
    out = []
    for group in our_groups(conn, config, str(conn.current_project_id)):
        out.append(
            RulesRecord(
                name=group.name, id=group.id, action=Action.DELETE, reason="teardown", applied=apply
            )
        )
        if not apply:
            continue
        _delete_when_free(conn, group)
        logger().info("deleted security group %s", group.name)
    return out
