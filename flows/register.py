"""Register the orchestration server: profile, blocks, pools, workers, deployments, smoke test."""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.records import Action
from flows import steps
from tasks.access import vm_for
from tasks.cloud import open_connection
from tasks.cloud.locate import VMTarget
from tasks.prefect_server import server_secrets
from tasks.smoke import SessionRecord
from tasks.ui import UIRecord
from tasks.vm import VM, StepRecord
from tasks.vm_lock import vm_exclusive
from tasks.vm_server import latest_artifact_id


class RegisterResult(BaseModel):
    environment: str
    api_url: str
    records: list[StepRecord] = Field(default_factory=list)
    smoke: StepRecord | None = None


@flow(name="register")
def register(
    config: BootstrapConfig = BootstrapConfig(),
    target: VMTarget | None = None,
    science_codebase: str | None = None,
    plan: bool = False,
) -> RegisterResult:
    """Make the VM's server ready for the pipeline: one command instead of `screen` sessions.
    ``plan=True`` only reads the server and says what would change."""
    if target is None:
        target = steps.locate_vm(open_connection(config), config)
    vm = vm_for(config, target)
    try:
        return register_on(vm, config, science_codebase, plan)
    finally:
        vm.close()


def register_on(
    vm: VM, config: BootstrapConfig, science_codebase: str | None = None, plan: bool = False
) -> RegisterResult:
    """Register's steps through ``vm`` (its opener closes it)."""
    apply = not plan
    # recovered from the VM if the block is gone
    secret = server_secrets(config, apply=apply, host=vm)
    auth = secret["auth_string"] if config.prefect.api_auth else None
    # operators reach the API through the ssh alias's forward; this run through its own
    result = RegisterResult(environment=config.environment, api_url=f"{config.ui_url}/api")
    records = result.records
    records.append(steps.ensure_local_profile(config, result.api_url, auth, apply))
    lock = vm_exclusive(vm, config, "register") if apply else contextlib.nullcontext()
    with lock, vm.api(config.prefect.port) as base:
        url = f"{base}/api"
        records.append(steps.install_code(vm, config, url, auth, apply))
        records.append(steps.ensure_code_venv(vm, config, apply))
        records.append(steps.copy_blocks(config, url, auth, apply))
        records.append(steps.ensure_work_pools(config, url, auth, apply))
        records.append(steps.ensure_workers(vm, config, url, auth, apply))
        records.append(steps.deploy(config, url, auth, apply))
        if science_codebase and apply:
            records.append(steps.deploy_science(vm, config, science_codebase))
    create_table_artifact(
        key=f"{'plan-' if plan else ''}register-{config.environment}",
        table=[r.row() for r in result.records],
        description="what register would change on the VM's server (nothing was changed)"
        if plan
        else "what register checked and changed on the VM's server",
    )
    return result


@flow(name="canfar-smoke-test")
def smoke_test(
    config: BootstrapConfig = BootstrapConfig(), target: VMTarget | None = None
) -> SessionRecord:
    """Launch a headless session from the VM, wait, read its logs, delete it."""
    if target is None:
        target = steps.locate_vm(open_connection(config), config)
    vm = vm_for(config, target)
    try:
        record = steps.canfar_smoke_test(vm, config)
    finally:
        vm.close()
    verdict = "FAILED" if record.action == Action.BLOCKED else "passed"
    create_markdown_artifact(
        key=f"canfar-smoke-{config.environment}",
        markdown=(
            f"# CANFAR headless smoke test: {verdict}\n\n"
            f"| | |\n|---|---|\n| session | `{record.id or '-'}` |\n"
            f"| status | {record.status} |\n"
            f"| duration | {record.seconds} s |\n| image | `{config.canfar.smoke_test.image}` |\n"
            f"| result | {record.reason} |\n\nLog tail:\n\n```\n{record.log_tail}\n```\n"
        ),
    )
    if record.action == Action.BLOCKED:
        raise BootstrapError(f"CANFAR smoke test {record.reason}")
    return record


@flow(name="ui-check")
def ui_check(
    config: BootstrapConfig = BootstrapConfig(),
    out_dir: str = "ui-screenshots",
    run_health: bool = True,
) -> UIRecord:
    """The VM server's UI as an operator sees it: run the health-check deployment there (so its
    artifact is current), log in with the auth string in headless Chromium, and screenshot the
    deployments page and the health artifact."""
    target = steps.locate_vm(open_connection(config), config)
    auth = (
        server_secrets(config, must_exist=True)["auth_string"] if config.prefect.api_auth else None
    )
    vm = vm_for(config, target)
    try:
        # as an operator's browser does: through an SSH forward (the server is on loopback)
        with vm.api(config.prefect.port) as ui_url:
            api_url = f"{ui_url}/api"
            health = None
            if run_health:
                health = steps.run_on_server(api_url, auth, "health-check/health-check")
            key = f"health-{config.environment}"
            artifact = latest_artifact_id(api_url, auth, key)
            if artifact is None:
                raise BootstrapError(
                    f"the VM's server has no {key!r} artifact yet: run the health-check "
                    "deployment there first (or leave out --no-run-health)"
                )
            record = steps.capture_ui(
                ui_url,
                auth,
                {
                    "deployments": ("/deployments", "health-check"),
                    "health-artifact": (f"/artifacts/artifact/{artifact}", "prefect-server"),
                },
                Path(out_dir),
            )
    finally:
        vm.close()
    lines = [
        f"# UI of `{config.environment}`",
        "",
        f"UI: {config.ui_url} while `ssh -N {config.ssh.alias}` runs",
        "",
    ]
    if health:
        lines.append(f"- health-check run on the VM: {health['state']} {health['message']}")
    lines += [f"- {p.name}: `{p.screenshot}` ({p.url})" for p in record.pages]
    create_markdown_artifact(key=f"ui-{config.environment}", markdown="\n".join(lines))
    return record
