"""The whole bootstrap, the registered server, and the repairs its automations trigger."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any

import pytest

from flows.bootstrap import bootstrap
from flows.configure import vm_for
from flows.register import register
from tasks.arc import probe_arc
from tasks.cloud import locate_vm, open_connection
from tasks.prefect_server import server_secrets
from tasks.register import remote_api

pytestmark = [pytest.mark.sandbox]


def vm_client(cfg: Any, address: str) -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for_run(client: Any, deployment: str, after: dt.datetime, timeout: float = 240) -> Any:
    """The first flow run of ``deployment`` created after ``after`` that reached a final state."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=after)
            ),
        )
        final = [r for r in runs if r.state and r.state.is_final()]
        if final:
            return final[0]
        time.sleep(2)
    raise AssertionError(f"no finished run of {deployment} within {timeout} s")


def test_bootstrap_register_and_self_repair(vm_config, canfar_sandbox) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config(
        "t-ops",
        canfar={"smoke_test": {"enabled": True, "timeout": 120}},
        prefect={"health_cron": "0 3 * * *"},
    )
    out = bootstrap(cfg)
    assert out["smoke"] and out["smoke"].startswith("Succeeded")
    target = locate_vm.fn(open_connection(cfg), cfg)
    url = f"http://{target.address}:{cfg.prefect.port}/api"
    auth = server_secrets(cfg)["auth_string"]

    from prefect.client.schemas.filters import DeploymentFilter

    def inventory() -> tuple[list[str], list[str], Any]:
        with remote_api(url, auth), vm_client(cfg, target.address) as client:
            deployments = client.read_deployments()
            automations = client.read_automations()
            pools = {p.name: p.concurrency_limit for p in client.read_work_pools()}
        names = sorted(d.name for d in deployments)
        health = next(d for d in deployments if d.name == "health-check")
        return names, sorted(a.name for a in automations), (health, pools)

    names, automations, (health, pools) = inventory()
    assert names == ["bootstrap", "health-check", "reauth-canfar", "remount-arc", "teardown"]
    assert len(automations) == 2
    assert [s.schedule.cron for s in health.schedules] == ["0 3 * * *"]
    assert health.pull_steps == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "/mnt/pspace/sails-bootstrap"
            }
        }
    ]
    assert pools["vm-runs"] == 2 and pools["headless-runs"] == 12, (pools, out.get("register"))

    register(cfg)  # again: one copy of everything, the schedule kept
    again, automations_again, (health_again, _) = inventory()
    assert again == names and automations_again == automations
    assert [s.schedule.cron for s in health_again.schedules] == ["0 3 * * *"]
    del DeploymentFilter

    # A frozen /arc host: the health check on the VM fails with "stale", and the automation
    # runs remount-arc, which leaves a live mount once the host is back.
    from prefect.deployments import run_deployment

    vm = vm_for(cfg, target)
    canfar_sandbox.arc_freeze()
    try:
        with remote_api(url, auth):
            start = dt.datetime.now(dt.UTC)
            run = run_deployment("health-check/health-check", timeout=180, as_subflow=False)
            assert run.state is not None and run.state.is_failed()
            assert "stale" in (run.state.message or "")
    finally:
        canfar_sandbox.arc_thaw()
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        remount = wait_for_run(client, "remount-arc", start)
    assert remount.created_by is not None  # started by the automation, not by this test
    deadline = time.monotonic() + 60
    while probe_arc(vm, cfg)[0] != "live" and time.monotonic() < deadline:
        time.sleep(1)
    assert probe_arc(vm, cfg)[0] == "live"
    with contextlib.suppress(Exception):
        vm.close()
