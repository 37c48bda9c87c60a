"""Health probes: all at once, each with its own time limit, none able to hang the check.

Each probe runs in its own daemon thread, in a copy of the caller's context (the Prefect settings
and run in use: a block loads from the same API); the check waits for each only until that probe's
deadline and reports "timeout" past it, leaving a stuck thread behind rather than waiting on it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import BootstrapConfig
from core.records import Action
from core.settings import IngressRule
from tasks.access import vm_for
from tasks.arc import probe_arc
from tasks.canfar import read_vm_expiry
from tasks.cloud import open_connection
from tasks.cloud.locate import locate_vm
from tasks.vm import VM, LocalHost

if TYPE_CHECKING:
    from openstack.connection import Connection

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class ProbeResult:
    probe: str
    status: str  # ok | warn | fail
    detail: str
    seconds: float
    critical: bool = True

    def row(self) -> dict[str, str]:
        return {
            "probe": self.probe,
            "status": self.status,
            "detail": self.detail,
            "duration": f"{self.seconds:.2f} s",
        }


@dataclass
class Probe:
    name: str
    fn: Callable[[], tuple[str, str]]
    timeout: float
    critical: bool = True


def run_probes(probes: list[Probe]) -> list[ProbeResult]:
    """Start every probe at once; collect each by its own deadline."""
    results: dict[str, tuple[str, str, float]] = {}
    start = time.monotonic()

    def runner(p: Probe) -> None:
        t0 = time.monotonic()
        try:
            status, detail = p.fn()
        except Exception as exc:
            status, detail = FAIL, f"{type(exc).__name__}: {exc}"[:300]
        results[p.name] = (status, detail, time.monotonic() - t0)

    threads = []
    for p in probes:
        t = threading.Thread(
            target=contextvars.copy_context().run,
            args=(runner, p),
            name=f"probe-{p.name}",
            daemon=True,
        )
        t.start()
        threads.append((p, t))
    out = []
    for p, t in threads:
        t.join(max(0.0, start + p.timeout - time.monotonic()))
        if p.name in results:
            status, detail, secs = results[p.name]
        else:
            status, detail, secs = FAIL, f"timeout: no answer within {p.timeout:.0f} s", p.timeout
        out.append(ProbeResult(p.name, status, detail, secs, p.critical))
    return out


# -- the probes --------------------------------------------------------------------------------
def describe_rule(rule: IngressRule) -> str:
    port = f" {rule.port}" if rule.port is not None else ""
    return f"ingress {rule.protocol}{port} from {rule.cidr}"


def ingress_probe(conn: Connection, config: BootstrapConfig) -> tuple[str, str]:
    """The environment's own security group holds exactly the configured ingress rules (the
    cloud enforces it: a missing port-22 rule locks the operator out, an extra one opens more
    than the config says), each difference named."""
    from tasks.cloud import our_groups
    from tasks.cloud.secgroup import describe_key, rule_key

    name = config.security_group_name
    groups = our_groups(conn, config, str(conn.current_project_id))
    if not groups:
        return FAIL, f"security group {name} not found in the project"
    group = conn.network.get_security_group(groups[0].id)
    have = {rule_key(r) for r in group.security_group_rules if r["direction"] == "ingress"}
    wanted = {r.key() for r in config.server.ingress}
    missing = [describe_rule(r) for r in config.server.ingress if r.key() not in have]
    extra = [f"ingress {describe_key(k)}" for k in have - wanted]
    problems = []
    if missing:
        problems.append(f"security group {name} lacks " + "; ".join(missing))
    if extra:
        problems.append(
            f"security group {name} has rules the config does not list: " + "; ".join(extra)
        )
    if problems:
        return FAIL, " and ".join(problems)
    return OK, f"security group {name} has exactly the {len(wanted)} configured ingress rules"


def cloud_probes(conn: Connection, config: BootstrapConfig, on_vm: bool = False) -> list[Probe]:
    """The cloud's side of the VM. ``on_vm``: run by the VM's own health check, where the
    keypair is compared with the cloud's public key (the private key is not there)."""
    from tasks.cloud import our_servers, our_volumes
    from tasks.cloud.floating_ip import server_port

    state: dict[str, Any] = {}

    def server() -> tuple[str, str]:
        servers = our_servers(conn, config)
        if not servers:
            return FAIL, f"no server {config.server_name}"
        s = servers[0]
        state["server"] = s
        return (OK if s.status == "ACTIVE" else FAIL), f"{s.name} {s.status}"

    def floating_ip() -> tuple[str, str]:
        servers = our_servers(conn, config)
        if not servers:
            return FAIL, "no server"
        port = server_port(conn, servers[0].id)
        fips = list(conn.network.ips(port_id=port.id)) if port else []
        if not fips:
            return FAIL, "no floating IP attached"
        f = fips[0]
        return (OK if f.status == "ACTIVE" else FAIL), f"{f.floating_ip_address} {f.status}"

    def volume() -> tuple[str, str]:
        vols = our_volumes(conn, config)
        if not vols:
            return FAIL, f"no volume {config.volume_name}"
        v = vols[0]
        servers = {s.id for s in our_servers(conn, config)}
        on = [a.get("server_id") for a in v.attachments or []]
        if v.status == "in-use" and servers & set(on):
            return OK, f"{v.name} in-use on the server"
        return FAIL, f"{v.name} {v.status}, attached to {on or 'nothing'}"

    def ingress() -> tuple[str, str]:
        return ingress_probe(conn, config)

    def drift() -> tuple[str, str]:
        from tasks.access import load_key
        from tasks.cloud.converge import converge
        from tasks.cloud.preflight import preflight

        key = load_key(config, apply=False, on_vm=on_vm)
        facts = preflight(conn, config, key)
        records = converge(conn, config, key, facts, apply=False).records()
        off = [
            f"{r.kind} {r.name}: {r.action} ({r.reason})"
            for r in records
            if r.action != Action.KEEP
        ]
        return (WARN if off else OK), ("; ".join(off) or "cloud matches the configuration")

    t = config.cloud.api_timeout
    return [
        Probe("server", server, t),
        Probe("floating-ip", floating_ip, t),
        Probe("volume", volume, t),
        Probe("security-group", ingress, t),
        Probe("drift", drift, 2 * t, critical=False),
    ]


def host_probes(host: VM, config: BootstrapConfig, address: str, local: bool) -> list[Probe]:
    mp = config.volume.mount_point

    def ssh() -> tuple[str, str]:
        if local:
            return OK, "running on the VM"
        r = host.run("true", timeout=20, check=False)
        return (OK if r.ok else FAIL), f"ssh {config.server.user}@{address}"

    def pspace() -> tuple[str, str]:
        r = host.run(
            f"findmnt -n -o SOURCE --mountpoint {shlex.quote(mp)} && "
            f"df -P -B1 {shlex.quote(mp)} | tail -1",
            timeout=20,
            check=False,
        )
        if not r.ok or not r.stdout.strip():
            return FAIL, f"{mp} is not mounted"
        lines = r.stdout.strip().splitlines()
        fields = lines[-1].split()
        free, size = int(fields[3]), int(fields[1])
        pct = 100 * free / size if size else 0
        status = OK if pct >= 10 else WARN
        return status, f"{lines[0]} mounted, {free / 2**30:.1f} GiB free ({pct:.0f}%)"

    def arc() -> tuple[str, str]:
        state, detail = probe_arc(host, config)
        return (OK if state == "live" else FAIL), f"{state}" + (f": {detail}" if detail else "")

    def prefect() -> tuple[str, str]:
        import httpx

        shown = f"127.0.0.1:{config.prefect.port}/api/health on the VM"
        with host.api(config.prefect.port) as base:  # loopback only: through SSH
            try:
                r = httpx.get(f"{base}/api/health", timeout=10)
            except httpx.HTTPError as exc:
                return FAIL, f"{shown}: {type(exc).__name__} (is prefect-server.service running?)"
        return (OK if r.status_code == 200 else FAIL), f"{shown} -> {r.status_code}"

    def certificate() -> tuple[str, str]:
        expiry = read_vm_expiry(host, config)
        if expiry is None:
            return FAIL, "no CANFAR certificate on the VM"
        left = (expiry - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        if left <= 0:
            return FAIL, f"expired on {expiry:%Y-%m-%d %H:%M} UTC"
        status = WARN if left < config.canfar.renew_days_before else OK
        return status, f"{left:.1f} days left (until {expiry:%Y-%m-%d})"

    def backup() -> tuple[str, str]:
        from tasks.backup_store import freshness

        return freshness(host, config, on_vm=local)

    def database() -> tuple[str, str]:
        from tasks.postgres import probe_database

        return probe_database(host, config)

    probes = [
        Probe("ssh", ssh, 30),
        Probe("pspace", pspace, 30),
        Probe("prefect-server", prefect, 20),
        Probe("canfar-certificate", certificate, 20),
        Probe("backup", backup, config.arc.probe_timeout + 10, critical=False),
    ]
    if config.prefect.database.kind == "postgresql":
        probes.append(Probe("database", database, 20))
    if config.arc.enabled:
        probes.append(Probe("arc-mount", arc, config.arc.probe_timeout + 2))
    return probes


# -- all of them -------------------------------------------------------------------------------
def probe_all(config: BootstrapConfig, on_vm: bool) -> list[ProbeResult]:
    """The cloud probes start at once; from this machine, the host probes start as soon as the
    VM is located (its address comes from the cloud), so the check takes about as long as the
    longer of the two chains rather than their sum."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    conn = open_connection(config)
    if on_vm:
        return run_probes(
            cloud_probes(conn, config, on_vm=True)
            + host_probes(LocalHost(), config, "127.0.0.1", True)
        )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-probes") as pool:
        context = contextvars.copy_context()  # the same Prefect API for the cloud probes
        cloud = pool.submit(context.run, run_probes, cloud_probes(conn, config))
        try:
            target = locate_vm(conn, config)
        except Exception as exc:
            reason = f"VM not located: {exc}"[:300]
            # The same probes, each reported failed (building them runs nothing).
            unrun = host_probes(LocalHost(), config, "", False)
            host = [ProbeResult(p.name, FAIL, reason, 0.0) for p in unrun]
        else:
            vm = vm_for(config, target)
            try:
                host = run_probes(host_probes(vm, config, target.address, False))
            finally:
                vm.close()
        return cloud.result() + host
