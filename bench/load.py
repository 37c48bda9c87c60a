"""The pipeline's load on the VM's Prefect server, SQLite against PostgreSQL, in one run.

    python -m bench.load [--minutes 4]      # make bench runs it after the main benchmarks

One sandbox VM, bootstrapped as `up` makes it, its workers running a stand-in of the science
codebase from /arc: 12 runs at once in headless-runs and 2 in vm-runs (kept full: a new run as
soon as one ends), each with tasks that log, and the monitor every minute on its cron schedule in
pipeline-state-monitoring, for ``--minutes``. Then the same VM is switched to PostgreSQL
(`prefect.database.switch`), registered again, and the same load runs. Reported side by side
in bench/RESULTS.md's "Load" section: runs finished and failed, "database is locked" in the
VM's journal, the API's p95 latency as the operator's client sees it, and the scheduler's lag
(the monitor's start against its scheduled time).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, clean, config, on_sandbox

LOAD_FLOW = """\
import time

from prefect import flow, get_run_logger, task


@task
def step(i: int, seconds: float) -> int:
    get_run_logger().info("step %d working for %.1f s", i, seconds)
    time.sleep(seconds)
    return i


@flow(name="load")
def load(tasks: int = 6, seconds: float = 3.0) -> int:
    log = get_run_logger()
    for i in range(tasks):
        step(i, seconds)
        log.info("%d of %d steps done", i + 1, tasks)
    return tasks


@flow(name="monitor")
def monitor() -> int:
    get_run_logger().info("the pipeline's state, checked")
    return step(0, 0.5)
"""

FLOWS_DIR = "projects/ALMA-SAILS/load-stand-in/flows"

LOAD_YAML = """\
name: load-stand-in
pull:
- prefect.deployments.steps.set_working_directory:
    directory: /home/{user}/canfar_arc/{flows}
deployments:
- name: load-headless
  entrypoint: load.py:load
  work_pool: {{name: headless-runs}}
- name: load-vm
  entrypoint: load.py:load
  work_pool: {{name: vm-runs}}
- name: monitor
  entrypoint: load.py:monitor
  work_pool: {{name: pipeline-state-monitoring}}
  schedules:
  - cron: "* * * * *"
"""

#: The deployments kept full, and how many of their runs at once (the pools' limits).
KEPT_FULL = {"load/load-headless": 12, "load/load-vm": 2}
ACTIVE = ("SCHEDULED", "PENDING", "RUNNING")


class Timed:
    """A client whose every call's duration is kept (the API's latency, as an operator's
    client sees it through its tunnel)."""

    def __init__(self, client: Any) -> None:
        self.client, self.durations = client, []

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.client, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return call(*args, **kwargs)
            finally:
                self.durations.append(time.monotonic() - t0)

        return timed


def runs_of(client: Any, deployment_id: Any, states: tuple[str, ...] = ()) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    run_filter = (
        FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType(s) for s in states])
            )
        )
        if states
        else None
    )
    return list(
        client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=run_filter,
            limit=200,
        )
    )


def sustain(client: Timed, minutes: float) -> dict[str, Any]:
    """Keep the load deployments full for ``minutes``, then wait for their runs to end."""
    ids = {
        name: client.read_deployment_by_name(name).id for name in [*KEPT_FULL, "monitor/monitor"]
    }
    started = dt.datetime.now(dt.UTC)
    end = time.monotonic() + minutes * 60
    created = 0
    while time.monotonic() < end:
        for name, limit in KEPT_FULL.items():
            # the pool's limit at work, and one waiting behind it
            for _ in range(limit + 1 - len(runs_of(client, ids[name], ACTIVE))):
                client.create_flow_run_from_deployment(ids[name])
                created += 1
        time.sleep(2)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(
        runs_of(client, ids[name], ACTIVE) for name in KEPT_FULL
    ):
        time.sleep(3)
    runs = {name: runs_of(client, ids[name]) for name in ids}
    finished = [r for name in KEPT_FULL for r in runs[name] if r.state and r.state.is_final()]
    failed = [r for r in finished if not r.state.is_completed()]
    lags = [
        (r.start_time - r.expected_start_time).total_seconds()
        for r in runs["monitor/monitor"]
        if r.start_time and r.expected_start_time and r.expected_start_time >= started
    ]
    return {
        "created": created,
        "finished": len(finished),
        "failed": len(failed),
        "failed_states": sorted({r.state.name for r in failed}),
        "unfinished": sum(len(runs_of(client, ids[n], ACTIVE)) for n in KEPT_FULL),
        "monitor_runs": len(lags),
        "lag_p95": _p95(lags),
        "lag_max": max(lags, default=float("nan")),
    }


def _p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def measure_one(cfg: Any, minutes: float, codebase: str) -> dict[str, Any]:
    """The load on ``cfg``'s VM as it runs now (registered with the load codebase)."""
    from flows.register import register
    from tasks.access import vm_for
    from tasks.cloud import open_connection
    from tasks.cloud.locate import locate_vm
    from tasks.prefect_server import server_secrets
    from tasks.vm_server import remote_client

    register(cfg, science_codebase=codebase)
    vm = vm_for(cfg, locate_vm(open_connection(cfg), cfg))
    since = int(vm.run("date +%s").stdout)
    try:
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(vm.api(cfg.prefect.port))
            auth = server_secrets(cfg, host=vm)["auth_string"] if cfg.prefect.api_auth else None
            client = Timed(stack.enter_context(remote_client(f"{base}/api", auth)))
            result = sustain(client, minutes)
            result["api_p95"] = _p95(client.durations)
            result["api_calls"] = len(client.durations)
        # each line's source: the unit that logged it (the server, a worker and its runs)
        journal = vm.run(
            f"journalctl --since @{since} --no-pager -o json | grep -i 'database is locked'",
            sudo=True,
            check=False,
        )
        entries = [json.loads(line) for line in journal.stdout.splitlines() if line[:1] == "{"]
        # (sudo's record of this very query holds the phrase too)
        units = [
            e.get("_SYSTEMD_UNIT", "?")
            for e in entries
            if "journalctl" not in str(e.get("MESSAGE", ""))
        ]
        result["locked"] = len(units)
        result["locked_by"] = dict(collections.Counter(units))
    finally:
        vm.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4, help="minutes of load per database")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()

    from sandbox import canfar, operator

    with on_sandbox("sails-load-") as tmp:
        from flows.bootstrap import bootstrap
        from flows.configure import configure
        from flows.teardown import teardown

        cfg = config("bench-load", tmp, canfar.info())
        clean(cfg, teardown)
        operator.save_blocks(cfg, fresh_arc_key=True)
        canfar.arc_write(f"{FLOWS_DIR}/load.py", LOAD_FLOW)
        canfar.arc_write(
            f"{FLOWS_DIR}/prefect.yaml", LOAD_YAML.format(user=cfg.prefect.user, flows=FLOWS_DIR)
        )
        codebase = f"~/canfar_arc/{FLOWS_DIR}"
        results: dict[str, dict[str, Any]] = {}
        try:
            print("1/3 the VM, as `up` makes it (SQLite)", flush=True)
            bootstrap(cfg)
            print(f"2/3 {args.minutes:g} min of the pipeline's load on SQLite", flush=True)
            results["SQLite"] = measure_one(cfg, args.minutes, codebase)
            print(f"3/3 switched to PostgreSQL, {args.minutes:g} min of the same", flush=True)
            db = cfg.prefect.database.model_copy(update={"kind": "postgresql", "switch": True})
            pg = cfg.model_copy(update={"prefect": cfg.prefect.model_copy(update={"database": db})})
            configure(pg)
            results["PostgreSQL"] = measure_one(pg, args.minutes, codebase)
        finally:
            clean(cfg, teardown)
    write_section(args, results)
    print(args.out.read_text())
    return 0


def write_section(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """The "Load" section of RESULTS.md, in place of the one there (the rest kept)."""
    names = list(results)
    rows = [
        ("flow runs finished (load deployments)", "finished", "{}"),
        ("failed or crashed", "failed", "{}"),
        ("still unfinished 10 min after the load", "unfinished", "{}"),
        ('"database is locked" in the VM\'s journal', "locked", "{}"),
        ("API p95 latency (operator's client)", "api_p95", "{:.3f} s"),
        ("scheduler lag p95 (monitor, every minute)", "lag_p95", "{:.1f} s"),
        ("scheduler lag max", "lag_max", "{:.1f} s"),
    ]
    lines = [
        "## Load: SQLite and PostgreSQL side by side",
        "",
        f"Produced by `python -m bench.load --minutes {args.minutes:g}` (part of `make bench`): "
        "one sandbox VM as `up` makes it; its workers kept 12 runs at once in headless-runs and "
        "2 in vm-runs (6 tasks of 3 s, each logging), the monitor on a cron of every minute, for "
        f"{args.minutes:g} min on SQLite, then the same on PostgreSQL after a switch.",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *[
            f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |"
            for label, key, fmt in rows
        ],
        "",
        "Runs created: "
        + ", ".join(
            f"{n} {results[n]['created']} ({results[n]['api_calls']} API calls)" for n in names
        )
        + ". Failed states: "
        + "; ".join(f"{n}: {', '.join(results[n]['failed_states']) or 'none'}" for n in names)
        + '. "database is locked" by unit: '
        + "; ".join(
            f"{n}: " + (", ".join(f"{u} {c}" for u, c in results[n]["locked_by"].items()) or "none")
            for n in names
        )
        + ".",
        "",
    ]
    text = args.out.read_text() if args.out.exists() else "# Benchmarks\n\n"
    head = text.split("\n## Load", 1)[0].rstrip("\n")
    args.out.write_text(head + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
