"""Host-side network plumbing shared by the sandbox's parts: the two bridges and guard routes.

Packets for the sandbox's ranges never leave the machine: each range has an ``unreachable``
guard route with a high metric, so while a bridge exists its route wins and after teardown
nothing can be sent anywhere.
"""

from __future__ import annotations

import subprocess

from sandbox import layout


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _link_exists(name: str) -> bool:
    return _ip("link", "show", name, check=False).returncode == 0


def _ensure_bridge(name: str, address: str, cidr: str) -> None:
    prefix = cidr.split("/")[1]
    if not _link_exists(name):
        _ip("link", "add", name, "type", "bridge")
    addrs = _ip("-o", "addr", "show", "dev", name).stdout
    if f" {address}/{prefix} " not in addrs:
        _ip("addr", "add", f"{address}/{prefix}", "dev", name)
    _ip("link", "set", name, "up")


def _ensure_guard(cidr: str) -> None:
    routes = _ip("route", "show", "table", "main", "type", "unreachable").stdout
    if not any(line.split()[1:2] == [cidr] for line in routes.splitlines()):
        _ip("route", "add", "unreachable", cidr, "metric", "4000")


def ensure_network() -> None:
    """Create the guard routes first, then the tenant and external bridges. Idempotent."""
    for cidr in (layout.TENANT_CIDR, layout.EXTERNAL_CIDR):
        _ensure_guard(cidr)
    _ensure_bridge(layout.TENANT_BRIDGE, layout.TENANT_GATEWAY, layout.TENANT_CIDR)
    _ensure_bridge(layout.EXTERNAL_BRIDGE, layout.EXTERNAL_GATEWAY, layout.EXTERNAL_CIDR)


def remove_network() -> None:
    """Delete both bridges; the guard routes stay until ``remove_guards``."""
    for name in (layout.TENANT_BRIDGE, layout.EXTERNAL_BRIDGE):
        if _link_exists(name):
            _ip("link", "del", name)


def remove_guards() -> None:
    for cidr in (layout.TENANT_CIDR, layout.EXTERNAL_CIDR):
        _ip("route", "del", "unreachable", cidr, check=False)


def network_present() -> bool:
    return _link_exists(layout.TENANT_BRIDGE) and _link_exists(layout.EXTERNAL_BRIDGE)
