"""Neutron service plugin that makes floating IPs route, as an L3 agent would, with nftables.

Every floating-IP change (and a port deletion, and the start of each neutron process) re-reads
all floating IPs and replaces one nft table atomically: DNAT floating -> fixed for packets that
arrive (prerouting) and for the host's own traffic (nat output), SNAT fixed -> floating on the
way out, and an immediate reject for any other address of the external subnet. Then the
floating IPs' status is set ACTIVE (associated) or DOWN, and conntrack entries of addresses that
lost their association are dropped.
"""

import fcntl
import ipaddress
import subprocess
import threading

from neutron_lib import constants
from neutron_lib import context as n_context
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins import constants as plugin_constants
from neutron_lib.plugins import directory
from neutron_lib.services import base as service_base
from oslo_log import log as logging

from sandbox import layout

LOG = logging.getLogger(__name__)
TABLE = "sails_fip"
_thread_lock = threading.Lock()


def _lock_file():
    path = layout.STATE_DIR / "run" / "floatingip.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def render_table(mapping: dict[str, str]) -> str:
    """nft script replacing the table for ``{floating: fixed}``."""
    ext = layout.EXTERNAL_CIDR
    gw = layout.EXTERNAL_GATEWAY
    lines = [
        f"table ip {TABLE} {{}}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  chain pre { type nat hook prerouting priority dstnat; policy accept;",
    ]
    lines += [f"    ip daddr {f} dnat to {x}" for f, x in sorted(mapping.items())]
    lines += ["  }", "  chain out { type nat hook output priority -100; policy accept;"]
    lines += [f"    ip daddr {f} dnat to {x}" for f, x in sorted(mapping.items())]
    lines += ["  }", "  chain post { type nat hook postrouting priority srcnat; policy accept;"]
    # The guests have no default route: traffic that reached one through its floating address
    # from off the tenant subnet (the host itself, mostly) leaves with the tenant gateway as
    # its source, which every guest reaches on-link.
    lines += [
        f"    ct status dnat ip daddr {layout.TENANT_CIDR} ip saddr != {layout.TENANT_CIDR}"
        f" snat to {layout.TENANT_GATEWAY}"
    ]
    lines += [
        f"    ip saddr {x} ip daddr != {layout.TENANT_CIDR} snat to {f}"
        for f, x in sorted(mapping.items())
    ]
    lines += [
        "  }",
        "  chain guard { type filter hook output priority 0; policy accept;",
        f"    ip daddr {ext} ip daddr != {gw} reject with icmp type host-unreachable",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply_table(mapping: dict[str, str]) -> None:
    subprocess.run(["nft", "-f", "-"], input=render_table(mapping), text=True, check=True)


def forget_connections(address: str) -> None:
    subprocess.run(["conntrack", "-D", "-d", address], capture_output=True, check=False)


class SandboxFloatingIPPlugin(service_base.ServicePluginBase):
    supported_extension_aliases: list[str] = []

    def __init__(self):
        super().__init__()
        registry.subscribe(
            self._on_fip_change,
            resources.FLOATING_IP,
            events.AFTER_CREATE,
        )
        registry.subscribe(self._on_fip_change, resources.FLOATING_IP, events.AFTER_UPDATE)
        registry.subscribe(self._on_fip_change, resources.FLOATING_IP, events.AFTER_DELETE)
        registry.subscribe(self._on_port_delete, resources.PORT, events.AFTER_DELETE)
        registry.subscribe(self._on_start, resources.PROCESS, events.AFTER_INIT)

    @classmethod
    def get_plugin_type(cls):
        return "sails_floatingip"

    def get_plugin_description(self):
        return "Floating IPs routed with nftables (sandbox)"

    # receivers -------------------------------------------------------------------------------
    def _on_fip_change(self, resource, event, trigger, payload):
        ctx = getattr(payload, "context", None)
        session = getattr(ctx, "session", None)
        # ml2's delete_port disassociates inside its own transaction: the database still shows
        # the old association then; PORT AFTER_DELETE (after commit) re-syncs instead.
        if session is not None and session.in_transaction():
            return
        self.sync()

    def _on_port_delete(self, resource, event, trigger, payload):
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
            LOG.exception("floating IP sync failed")

    def _sync(self) -> None:
        l3 = directory.get_plugin(plugin_constants.L3)
        if l3 is None:
            return
        ctx = n_context.get_admin_context()
        fips = l3.get_floatingips(ctx)
        ext = ipaddress.ip_network(layout.EXTERNAL_CIDR)
        mapping: dict[str, str] = {}
        for fip in fips:
            addr, fixed = fip["floating_ip_address"], fip.get("fixed_ip_address")
            if fip.get("port_id") and fixed and ipaddress.ip_address(addr) in ext:
                mapping[addr] = fixed
        previous = _read_applied()
        apply_table(mapping)
        for addr, fixed in previous.items():
            if mapping.get(addr) != fixed:
                forget_connections(addr)
        for fip in fips:
            want = (
                constants.FLOATINGIP_STATUS_ACTIVE
                if fip["floating_ip_address"] in mapping
                else constants.FLOATINGIP_STATUS_DOWN
            )
            if fip["status"] != want:
                l3.update_floatingip_status(ctx, fip["id"], want)
        LOG.info("floating IPs synced: %s", mapping)


def _read_applied() -> dict[str, str]:
    """The mapping currently in the kernel (another process may have written it)."""
    out = subprocess.run(
        ["nft", "list", "chain", "ip", TABLE, "pre"], capture_output=True, text=True, check=False
    ).stdout
    mapping = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[:2] == ["ip", "daddr"] and parts[3:5] == ["dnat", "to"]:
            mapping[parts[2]] = parts[5]
    return mapping
