"""Neutron service plugin that enforces security groups on the sandbox's guests, as a firewall
driver would, with one nft table per guest.

Every security-group, rule and port change (and the start of each neutron process) re-reads
all ports of Nova servers, their groups and rules, renders one ruleset per server and hands it
to ``sandbox.guests.firewall``, which keeps it and loads it into the guest's network namespace
(or, for a guest not started yet, when it starts).

What a ruleset admits, in the guest's namespace (family inet, so IPv4 and IPv6):
- ingress: loopback; replies to the guest's own connections (conntrack established/related);
  IPv6 neighbour discovery; and what the port's groups' ingress rules allow (protocol, port
  range or ICMP type/code, remote CIDR or the fixed IPs of a remote group's ports). Anything
  else is dropped, as Neutron drops it (a client times out; nothing answers "refused").
- egress: the same, from the egress rules (Neutron gives every new group "any" egress rules).
- a port with port security disabled is not filtered.
Established connections survive a rule's removal; new ones follow the new rules at once.

Remote CIDRs and the sandbox's addresses: the host reaches a guest through its floating IP with
its source rewritten to the tenant gateway (see ``floatingip.py``), and directly from the
tenant bridge with that same address. So every connection from the host (tests, the product
run on this machine) arrives from ``layout.TENANT_GATEWAY`` (10.211.0.1): a rule from 0.0.0.0/0
or from a network holding 10.211.0.1 admits it; a rule naming some other network (an
operator's office range, say) does not. Guest-to-guest traffic keeps each guest's fixed IP.
"""

import fcntl
import ipaddress
import threading

from neutron_lib import context as n_context
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins import directory
from neutron_lib.services import base as service_base
from oslo_log import log as logging

from sandbox import layout
from sandbox.guests import firewall

LOG = logging.getLogger(__name__)
_thread_lock = threading.Lock()

#: Neutron protocol names nft knows under another name.
_PROTO_ALIASES = {"icmpv6": "ipv6-icmp", "ipv6-icmp": "ipv6-icmp", "ipip": "ipencap"}
_PORTED = {"tcp", "udp", "sctp", "dccp", "udplite"}


def guest_name(device_id: str) -> str:
    """The sandbox guest behind a Nova server (as the sandbox's Nova driver names it)."""
    return "os-" + device_id.replace("-", "")[:12]


def _lock_file():
    path = layout.STATE_DIR / "run" / "secgroups.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def _proto(rule: dict) -> str | None:
    proto = rule.get("protocol")
    if proto in (None, "", "any"):
        return None
    proto = str(proto).lower()
    if proto == "icmp" and rule.get("ethertype") == "IPv6":
        return "ipv6-icmp"
    return _PROTO_ALIASES.get(proto, proto)


def render_rule(rule: dict, members: dict[str, list[str]]) -> str | None:
    """One nft statement for a Neutron rule (None: the rule can match nothing here)."""
    v6 = rule.get("ethertype") == "IPv6"
    family, addr = ("ipv6", "ip6") if v6 else ("ipv4", "ip")
    peer = "saddr" if rule["direction"] == "ingress" else "daddr"
    parts = [f"meta nfproto {family}"]
    cidr = rule.get("remote_ip_prefix")
    if rule.get("remote_address_group_id"):
        return None  # address groups are not modelled
    if rule.get("remote_group_id"):
        ips = [
            ip
            for ip in members.get(rule["remote_group_id"], [])
            if ipaddress.ip_address(ip).version == (6 if v6 else 4)
        ]
        if not ips:
            return None
        parts.append(f"{addr} {peer} {{ {', '.join(sorted(ips))} }}")
    elif cidr and ipaddress.ip_network(cidr, strict=False).prefixlen > 0:
        parts.append(f"{addr} {peer} {ipaddress.ip_network(cidr, strict=False)}")
    proto = _proto(rule)
    low, high = rule.get("port_range_min"), rule.get("port_range_max")
    if proto is None:
        pass
    elif proto in ("icmp", "ipv6-icmp"):
        icmp = "icmp" if proto == "icmp" else "icmpv6"
        parts.append(f"meta l4proto {proto}")
        if low is not None:
            parts.append(f"{icmp} type {int(low)}")
            if high is not None:
                parts.append(f"{icmp} code {int(high)}")
    else:
        parts.append(f"meta l4proto {proto}")
        if proto in _PORTED and low is not None:
            high = low if high is None else high
            span = str(int(low)) if int(low) == int(high) else f"{int(low)}-{int(high)}"
            parts.append(f"th dport {span}")
    return " ".join(parts) + " accept"


def render_ruleset(rules: list[dict], members: dict[str, list[str]], comment: str = "") -> str:
    """nft script replacing the guest's table, from its groups' rules."""
    chains = {"ingress": [], "egress": []}
    for rule in sorted(rules, key=lambda r: r.get("id") or ""):
        stmt = render_rule(rule, members)
        if stmt is not None and rule["direction"] in chains:
            chains[rule["direction"]].append(stmt)
    base = [
        'iifname "lo" accept',
        "ct state established,related accept",
        "ct state invalid drop",
        "meta l4proto ipv6-icmp icmpv6 type"
        " { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
    ]
    out_base = ['oifname "lo" accept', *base[1:]]
    t = firewall.TABLE
    lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{"]
    if comment:
        lines.append(f"  comment {_quote(comment)}")
    lines.append("  chain ingress { type filter hook input priority filter; policy drop;")
    lines += [f"    {s}" for s in base + chains["ingress"]]
    lines.append("  }")
    lines.append("  chain egress { type filter hook output priority filter; policy drop;")
    lines += [f"    {s}" for s in out_base + chains["egress"]]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + "".join(ch for ch in text if ch.isalnum() or ch in " -_.,:/") + '"'


class SandboxSecurityGroupPlugin(service_base.ServicePluginBase):
    supported_extension_aliases: list[str] = []

    def __init__(self):
        super().__init__()
        watched = {
            resources.SECURITY_GROUP: (
                events.AFTER_CREATE,
                events.AFTER_UPDATE,
                events.AFTER_DELETE,
            ),
            resources.SECURITY_GROUP_RULE: (events.AFTER_CREATE, events.AFTER_DELETE),
            resources.PORT: (events.AFTER_CREATE, events.AFTER_UPDATE, events.AFTER_DELETE),
        }
        for resource, kinds in watched.items():
            for event in kinds:
                registry.subscribe(self._on_change, resource, event)
        registry.subscribe(self._on_start, resources.PROCESS, events.AFTER_INIT)

    @classmethod
    def get_plugin_type(cls):
        return "sails_secgroups"

    def get_plugin_description(self):
        return "Security groups enforced with nftables in the guests' namespaces (sandbox)"

    # receivers -------------------------------------------------------------------------------
    def _on_change(self, resource, event, trigger, payload=None):
        ctx = getattr(payload, "context", None)
        session = getattr(ctx, "session", None)
        # Inside a transaction the database does not show the change yet to the fresh context
        # the sync reads with; the event published after the commit syncs instead.
        if session is not None and session.in_transaction():
            return
        self.sync()

    def _on_start(self, resource, event, trigger, payload=None):
        self.sync()

    # the data path ---------------------------------------------------------------------------
    def sync(self) -> None:
        try:
            with _thread_lock, _lock_file() as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._sync()
        except Exception:
            LOG.exception("security group sync failed")

    def _sync(self) -> None:
        core = directory.get_plugin()
        if core is None:
            return
        ctx = n_context.get_admin_context()
        ports = core.get_ports(ctx)
        rules_by_group: dict[str, list[dict]] = {}
        for rule in core.get_security_group_rules(ctx):
            rules_by_group.setdefault(rule["security_group_id"], []).append(rule)
        members: dict[str, list[str]] = {}
        for port in ports:
            for group in port.get("security_groups") or []:
                members.setdefault(group, []).extend(ip["ip_address"] for ip in port["fixed_ips"])
        wanted: dict[str, str | None] = {}
        for port in ports:
            if not (port.get("device_owner") or "").startswith("compute:"):
                continue
            if not port.get("device_id"):
                continue
            name = guest_name(port["device_id"])
            if port.get("port_security_enabled") is False:
                wanted[name] = None
                continue
            groups = port.get("security_groups") or []
            rules = [r for g in groups for r in rules_by_group.get(g, [])]
            wanted[name] = render_ruleset(rules, members, f"port {port['id']}")
        loaded = []
        for name, script in sorted(wanted.items()):
            try:
                if firewall.install(name, script):
                    loaded.append(name)
            except Exception:
                LOG.exception("security groups of guest %s not loaded", name)
        for name in firewall.installed():
            if name not in wanted:
                try:
                    firewall.install(name, None)
                except Exception:
                    LOG.exception("security groups of guest %s not removed", name)
        LOG.info("security groups synced: %d guest(s), loaded in %s", len(wanted), loaded)
