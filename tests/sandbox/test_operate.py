"""The whole bootstrap, the registered server, and the repairs its automations trigger."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from flows.bootstrap import bootstrap
from flows.configure import vm_for
from flows.register import register, smoke_test, ui_check
from tasks.arc import probe_arc
from tasks.canfar import read_vm_expiry, vm_cert_path
from tasks.cloud import locate_vm, open_connection
from tasks.errors import BootstrapError
from tasks.prefect_server import server_secrets
from tasks.register import remote_api, run_on_server

pytestmark = [pytest.mark.sandbox]


SCIENCE_FLOW = """\
from prefect import flow


@flow(name="science-hello")
def hello(who: str = "ALMA-SAILS") -> str:
    return f"hello {who}"
"""

SCIENCE_YAML = """\
name: science-stand-in
pull:
- prefect.deployments.steps.set_working_directory:
    directory: /home/{user}/canfar_arc/projects/ALMA-SAILS/alma-sails-codebase/flows
deployments:
- name: hello-vm
  entrypoint: hello.py:hello
  work_pool: {{name: vm-runs}}
- name: hello-headless
  entrypoint: hello.py:hello
  work_pool: {{name: headless-runs}}
"""


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


def run_logs(client: Any, run: Any) -> str:
    """The run's log lines, for an assertion message."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-3000:]


def test_bootstrap_register_and_self_repair(vm_config, canfar_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
        remount_logs = run_logs(client, remount)
    assert remount.created_by is not None  # started by the automation, not by this test
    assert remount.state.is_completed(), remount_logs
    deadline = time.monotonic() + 60
    while probe_arc(vm, cfg)[0] != "live" and time.monotonic() < deadline:
        time.sleep(1)
    assert probe_arc(vm, cfg)[0] == "live"

    # An expired CANFAR certificate: the health check fails naming it, the automation runs
    # reauth-canfar, which installs a fresh one from the CanfarCredentials block.
    user = cfg.server.user

    def expire_certificate() -> None:
        vm.write_file(
            vm_cert_path(cfg),
            canfar_sandbox.mint_certificate(seconds=-60),
            mode="0600",
            owner=f"{user}:{user}",
            sudo=False,
        )

    expire_certificate()
    start = dt.datetime.now(dt.UTC)
    old = read_vm_expiry(vm, cfg)
    assert old is not None and old < start
    health_run = run_on_server.fn(url, auth, "health-check/health-check", timeout=180)
    assert health_run["state"] == "Failed" and "expired" in health_run["message"], health_run
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        reauth = wait_for_run(client, "reauth-canfar", start)
        reauth_logs = run_logs(client, reauth)
    assert reauth.created_by is not None and reauth.state.is_completed(), reauth_logs
    new = read_vm_expiry(vm, cfg)
    assert new is not None and new > start + dt.timedelta(days=1)

    # The science codebase, kept on /arc as the operators keep it: `register` deploys its own
    # prefect.yaml, and the VM's workers run it from there.
    flows_dir = "projects/ALMA-SAILS/alma-sails-codebase/flows"
    canfar_sandbox.arc_write(f"{flows_dir}/hello.py", SCIENCE_FLOW)
    canfar_sandbox.arc_write(f"{flows_dir}/prefect.yaml", SCIENCE_YAML.format(user=user))
    science = register(cfg, science_codebase=f"~/canfar_arc/{flows_dir}")
    assert [r.action for r in science.records if r.name == "science deployments"] == ["change"]
    for name in ("hello-vm", "hello-headless"):
        run = run_on_server.fn(url, auth, f"science-hello/{name}", timeout=180)
        assert run["state"] == "Completed", run
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        pools = {d.name: d.work_pool_name for d in client.read_deployments()}
    assert pools["hello-vm"] == "vm-runs" and pools["hello-headless"] == "headless-runs"

    # The UI as a person sees it: health check run on the VM, log in, two screenshots.
    ui = ui_check(cfg, str(tmp_path / "ui"))
    deployments = ui.page("deployments").text
    for name in [*names, "hello-vm", "hello-headless"]:
        assert name in deployments, deployments
    assert "At 03:00 AM" in deployments, deployments  # the health check's schedule
    artifact = ui.page("health-artifact").text
    for probe in ("arc-mount", "canfar-certificate", "prefect-server", "pspace"):
        assert probe in artifact, artifact
    assert "fail" not in artifact, artifact
    for page in ui.pages:
        assert Path(page.screenshot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A failing smoke test names its cause, and deletes its session even then.
    def smoke(**settings: Any) -> str:
        changed = cfg.canfar.smoke_test.model_copy(update=settings)
        c = cfg.model_copy(update={"canfar": cfg.canfar.model_copy(update={"smoke_test": changed})})
        with pytest.raises(BootstrapError) as err:
            smoke_test(c, target)
        return str(err.value)

    assert "image: " in smoke(image="images.canfar.net/skaha/no-such-image:0")
    assert "quota: HTTP 400: Invalid value for 'cores': 64" in smoke(cores=64)  # 16 offered
    canfar_sandbox.set_failure(start_delay=60)  # the session stays Pending
    try:
        assert "timeout: still Pending" in smoke(timeout=4)
    finally:
        canfar_sandbox.set_failure()
    assert not [s for s in canfar_sandbox.sessions() if s["status"] in ("Pending", "Running")]
    canfar_sandbox.set_failure(fail_next_creates=1, status=503)
    assert "HTTP 503" in smoke()
    expire_certificate()  # the client refuses it before any request
    assert "auth: " in smoke()
    with contextlib.suppress(Exception):
        vm.close()
