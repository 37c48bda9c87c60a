"""Benchmarks on the sandbox cloud with realistic latencies, measured side by side in one run.

    make bench            # or: python -m bench [--api-delay 0.1 --build 30 --volume 10]

Writes bench/RESULTS.md. Every number is a ratio of two measurements taken in the same run on
the same machine, so the table speaks of the design, not of the machine:

1. fresh provisioning: the flow (independent steps at once) against the critical path of its
   own steps, and against the same steps run one after another (as a playbook runs them);
   and against a bare server's build (create → ACTIVE), which no tool can go below;
2. a no-op re-run: API calls (all reads, zero writes) and wall time beyond Prefect's start-up;
3. the first configure of a bare cloud-init guest (packages, volume, venv, server, /arc)
   against a no-op configure, and the health check (beyond an empty flow) against its slowest
   single probe;
4. a no-op register (nothing changed on the VM's Prefect server) and a no-op `up`;
5. the time to detect a frozen /arc host, against the probe's own limit;
6. recovery: a lost VM (`up` again on the kept volume) and a lost volume (`up` on a new one,
   then `restore` from the copy on /arc), each against a fresh `up` in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def timer(out: dict[str, float], key: str) -> Any:
    t0 = time.monotonic()
    yield
    out[key] = time.monotonic() - t0


def config(name: str, tmp: Path, canfar_info: dict[str, Any], **extra: Any) -> Any:
    from prefect.utilities.collections import deep_merge

    from core.config import parse_config

    base = {
        "environment": name,
        "ssh": {"key_block": f"{name}-key", "config_dir": str(tmp / name / "ssh")},
        "volume": {"size_gb": 2},
        "arc": {
            "enabled": True,
            "host": canfar_info["arc_host"],
            "port": canfar_info["arc_port"],
            "user": canfar_info["arc_user"],
            "key_block": f"{name}-arc-key",
        },
        "canfar": {"credentials_block": f"{name}-canfar", "smoke_test": {"enabled": False}},
        "prefect": {"package_index": canfar_info["package_index"], "auth_block": f"{name}-auth"},
        "ca_bundle": canfar_info["ca_bundle"],
    }
    return parse_config(deep_merge(base, extra), name)


def clean(cfg: Any, teardown: Any) -> None:
    """Remove an environment's server, floating IP, volume and keypair (each bench run starts
    a fresh Prefect server, so keys from an earlier run are not in its blocks)."""
    import openstack

    try:
        teardown(cfg, delete_data_volume=True)
    except Exception as exc:
        print(f"teardown {cfg.environment}: {exc}", file=sys.stderr)
    conn = openstack.connect(cloud=os.environ["OS_CLOUD"])
    conn.compute.delete_keypair(cfg.keypair_name, ignore_missing=True)
    conn.close()


def sequential_provision(cfg: Any) -> tuple[float, dict[str, float]]:
    """The same steps, one after another, each waiting for the last (a playbook's order)."""
    from flows.steps import timed
    from tasks.access import load_key
    from tasks.cloud import open_connection
    from tasks.cloud.console import console_fingerprints
    from tasks.cloud.converge import converge
    from tasks.cloud.preflight import preflight
    from tasks.local_ssh import ensure_local_ssh

    steps: dict[str, float] = {}
    t0 = time.monotonic()
    key = load_key(cfg, apply=True)
    conn = open_connection(cfg)
    with timer(steps, "preflight"):
        facts = preflight(conn, cfg, key)
    cloud = converge(conn, cfg, key, facts, apply=True, run=timed(steps))
    with timer(steps, "host-keys"):
        fps = console_fingerprints(conn, str(cloud.server.id))
        ensure_local_ssh(cfg, key, str(cloud.floating_ip.address), fps)
    return time.monotonic() - t0, steps


def critical_path(s: dict[str, float]) -> float:
    """The longest chain of dependent steps in the flow's graph (``converge``'s order)."""
    server = max(s["ensure-keypair"], s["ensure-security-group"]) + s["ensure-server"]
    return s["preflight"] + max(
        max(server, s["reserve-floating-ip"]) + s["ensure-floating-ip"] + s["host-keys"],
        max(server, s["ensure-volume"]) + s["ensure-attachment"],
    )


def server_build(cfg: Any) -> float:
    """A bare server's build as the cloud does it: create, then poll until ACTIVE (what no
    tool can go below), deleted again."""
    import openstack

    conn = openstack.connect(cloud=os.environ["OS_CLOUD"])
    internal = [
        n
        for n in conn.network.networks()
        if not n.is_router_external and cfg.server.network in (None, n.name, n.id)
    ]
    image = conn.image.find_image(cfg.server.image)
    flavor = conn.compute.find_flavor(cfg.server.flavor)
    t0 = time.monotonic()
    server = conn.compute.create_server(
        name=f"{cfg.environment}-bare",
        image_id=image.id,
        flavor_id=flavor.id,
        networks=[{"uuid": internal[0].id}],
    )
    try:
        conn.compute.wait_for_server(server, interval=1, wait=300)
        return time.monotonic() - t0
    finally:
        conn.compute.delete_server(server, ignore_missing=True)
        conn.compute.wait_for_delete(server, interval=1, wait=300)
        conn.close()


@contextmanager
def on_sandbox(prefix: str) -> Iterator[Path]:
    """The sandbox up, its exports in this process, a Prefect server of this run's own; a
    scratch folder."""
    from sandbox import manager
    from sandbox.prefect_server import serving_prefect

    manager.up()
    os.environ.update(manager.env())
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    with serving_prefect(tmp / "prefect"):
        yield tmp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-delay", type=float, default=0.1, help="seconds per API call")
    parser.add_argument("--build", type=float, default=30, help="server build seconds")
    parser.add_argument("--volume", type=float, default=10, help="volume creation seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()

    with on_sandbox("sails-bench-") as tmp:
        results = measure(args, tmp)
    write_results(args, results)
    print(args.out.read_text())
    return 0


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from sandbox import canfar, latency, operator
    from sandbox.faults import FaultControl

    info = canfar.info()
    faults = FaultControl()
    results: dict[str, Any] = {}
    a = config("bench-a", tmp, info)
    b = config("bench-b", tmp, info)
    warm = config("bench-warm", tmp, info)
    from flows.teardown import teardown

    for cfg in (a, b, warm):  # what an interrupted earlier run may have left
        clean(cfg, teardown)
    for cfg in (a, b):
        operator.save_blocks(cfg, fresh_arc_key=True)

    from prefect import flow

    from flows.bootstrap import bootstrap
    from flows.configure import configure
    from flows.operate import health_check
    from flows.provision import provision
    from flows.register import register
    from tasks.arc import probe_arc
    from tasks.cloud import open_connection
    from tasks.cloud.locate import locate_vm

    @flow
    def empty() -> None:
        return None

    try:
        faults.replace({"*": {"delay": args.api_delay}}, seed=1)
        latency.set_latency(boot=args.build, volume_create=args.volume)
        empty()  # the first flow of a process pays for the client's start-up
        with timer(results, "prefect_overhead"):
            empty()

        # The first server boot after `sandbox up` pays for cold caches; it would count against
        # whichever of the two side-by-side measurements came first.
        print("0/6 warm-up: one untimed server boot", flush=True)
        latency.set_latency()
        provision(warm)
        clean(warm, teardown)
        latency.set_latency(boot=args.build, volume_create=args.volume)

        print("1/6 fresh provisioning: a bare server's build, the flow, the steps one by one")
        results["bare_build"] = server_build(a)
        with timer(results, "flow"):
            provision(a)
        results["sequential"], steps = sequential_provision(b)
        results["critical_path"] = critical_path(steps)
        results["steps"] = steps

        print("2/6 no-op re-run", flush=True)
        faults.reset()
        faults.replace({"*": {"delay": args.api_delay}}, seed=1)
        with timer(results, "noop"):
            provision(a)
        counts = faults.counts()["counts"]
        results["noop_calls"] = sum(sum(m.values()) for m in counts.values())
        results["noop_writes"] = faults.writes()

        print("3/6 configure, register, health check against its slowest probe", flush=True)
        latency.set_latency()
        faults.replace({"*": {"delay": args.api_delay}}, seed=1)
        with timer(results, "first_configure"):
            first = configure(a)  # the guest as it booted: cloud-init, no sshfs, no venv
        results["first_changed"] = [r.name for r in first.records if r.changed]
        with timer(results, "noop_configure"):
            configure(a)
        print("4/6 no-op register and no-op up", flush=True)
        register(a)
        with timer(results, "noop_register"):
            again = register(a)
        results["noop_register_changed"] = [r.name for r in again.records if r.changed]
        with timer(results, "noop_up"):
            bootstrap(a)
        report = health_check(a)
        durations = {r["probe"]: float(r["duration"].split()[0]) for r in report.results}
        with timer(results, "health"):
            report = health_check(a)
        durations = {r["probe"]: float(r["duration"].split()[0]) for r in report.results}
        results["slowest_probe"] = max(durations.values())
        results["slowest_name"] = max(durations, key=lambda k: durations[k])

        print("5/6 frozen /arc host", flush=True)
        from tasks.access import vm_for

        vm = vm_for(a, locate_vm(open_connection(a), a))
        canfar.arc_freeze()
        try:
            t0 = time.monotonic()
            state, _ = probe_arc(vm, a)
            results["detect"] = time.monotonic() - t0
            results["detect_state"] = state
            results["probe_limit"] = a.arc.probe_timeout
        finally:
            canfar.arc_thaw()
            vm.close()

        print("6/6 recovery: VM lost (down, up), volume lost (up, restore)", flush=True)
        from flows.backup import backup, restore

        clean(b, teardown)  # b's VM (from step 1) is not needed: its quota frees up
        with timer(results, "fresh_up"):
            bootstrap(b)  # from nothing: the reference for both recoveries
        teardown(a)  # the server goes, the volume stays
        with timer(results, "vm_lost"):
            bootstrap(a)
        copy = backup(a)
        assert copy is not None, "no backup made"
        lost = locate_vm(open_connection(a), a).volume_id
        teardown(a, delete_data_volume=True, volume_id=lost)
        with timer(results, "volume_lost"):
            bootstrap(a)
            restore(a)
    finally:
        faults.clear()
        latency.set_latency()
        for cfg in (a, b, warm):
            clean(cfg, teardown)
    return results


def write_results(args: argparse.Namespace, r: dict[str, Any]) -> None:
    beyond = max(0.0, r["noop"] - r["prefect_overhead"])  # below zero is noise
    rows = [
        (
            "fresh provisioning: flow minus a bare server's build",
            f"{r['flow'] - r['bare_build']:+.1f} s",
            "≤ +5 s",
            f"{r['flow']:.1f} s vs {r['bare_build']:.1f} s (create → ACTIVE, nothing else)",
        ),
        (
            "fresh provisioning: flow / critical path of its steps",
            f"{r['flow'] / r['critical_path']:.2f}",
            "≤ 1.20",
            f"{r['flow']:.1f} s vs {r['critical_path']:.1f} s",
        ),
        (
            "fresh provisioning: steps one by one / flow",
            f"{r['sequential'] / r['flow']:.2f}",
            "> 1 (faster than a playbook)",
            f"{r['sequential']:.1f} s vs {r['flow']:.1f} s",
        ),
        (
            "no-op provision: write calls",
            str(r["noop_writes"]),
            "0",
            f"{r['noop_calls']} API calls (target ≤ 15), all reads",
        ),
        (
            "no-op provision: wall time beyond Prefect start-up",
            f"{beyond:.1f} s",
            "≤ 2 s",
            f"{r['noop']:.1f} s run, {r['prefect_overhead']:.1f} s empty flow "
            f"({beyond / args.api_delay:.0f} API-call delays)",
        ),
        (
            "no-op register: steps that changed anything",
            str(len(r["noop_register_changed"])),
            "0",
            f"{r['noop_register']:.1f} s; " + (", ".join(r["noop_register_changed"]) or "all keep"),
        ),
        (
            "no-op up (provision, configure, register) / no-op provision",
            f"{r['noop_up'] / r['noop']:.1f}",
            "-",
            f"{r['noop_up']:.1f} s vs {r['noop']:.1f} s",
        ),
        (
            "first-boot configure (bare cloud-init guest, packages included) / no-op configure",
            f"{r['first_configure'] / r['noop_configure']:.1f}",
            "-",
            f"{r['first_configure']:.1f} s vs {r['noop_configure']:.1f} s; changed: "
            + ", ".join(r["first_changed"]),
        ),
        (
            # the probes run at once: beyond Prefect's own start of a flow run, the check
            # should take about its slowest probe (plus locating the VM and one SSH login)
            "health check beyond an empty flow / its slowest probe",
            f"{max(0.0, r['health'] - r['prefect_overhead']) / r['slowest_probe']:.2f}",
            "≤ 1.30",
            f"{r['health']:.1f} s run, {r['prefect_overhead']:.1f} s empty flow, slowest probe "
            f"{r['slowest_probe']:.1f} s ({r['slowest_name']})",
        ),
        (
            "frozen /arc detected / probe limit",
            f"{r['detect'] / r['probe_limit']:.2f}",
            "≤ 1.25 (10 s for the default 8 s limit)",
            f"'{r['detect_state']}' after {r['detect']:.1f} s",
        ),
        (
            "recovery, VM lost (`up` on the kept volume) / a fresh `up`",
            f"{r['vm_lost'] / r['fresh_up']:.2f}",
            "-",
            f"{r['vm_lost']:.0f} s vs {r['fresh_up']:.0f} s",
        ),
        (
            "recovery, volume lost (`up` on a new volume, then `restore` from /arc) / a fresh `up`",
            f"{r['volume_lost'] / r['fresh_up']:.2f}",
            "-",
            f"{r['volume_lost']:.0f} s vs {r['fresh_up']:.0f} s",
        ),
    ]
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in r["steps"].items())
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench`) on the sandbox cloud with "
        f"{args.api_delay * 1000:.0f} ms per API call, {args.build:.0f} s server builds and "
        f"{args.volume:.0f} s volume creation. Ratios of measurements taken in the same run.",
        "",
        "| measure | ratio | target | measured |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Steps when run one by one: {steps}.",
        "",
    ]
    # (the load benchmark's section, written by `python -m bench.load`, is kept)
    kept = args.out.read_text().split("\n## Load", 1) if args.out.exists() else []
    load = "\n## Load" + kept[1] if len(kept) == 2 else ""
    args.out.write_text("\n".join(lines) + load)


if __name__ == "__main__":
    sys.exit(main())
