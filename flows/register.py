"""Register the orchestration server: profile, blocks, pools, workers, deployments, smoke test."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from flows.configure import vm_for
from sails_bootstrap.config import BootstrapConfig
from tasks.cloud import VMTarget, locate_vm, open_connection
from tasks.errors import BootstrapError
from tasks.prefect_server import server_secrets
from tasks.records import Action
from tasks.register import (
    copy_blocks,
    deploy,
    deploy_science,
    ensure_local_profile,
    ensure_work_pools,
    ensure_workers,
    install_code,
)
from tasks.smoke import canfar_smoke_test
from tasks.vm import StepRecord


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
) -> RegisterResult:
    """Make the VM's server ready for the pipeline: one command instead of `screen` sessions."""
    if target is None:
        target = locate_vm(open_connection(config), config)
    secret = server_secrets(config)
    auth = secret["auth_string"] if config.prefect.api_auth else None
    url = f"http://{target.address}:{config.prefect.port}/api"
    result = RegisterResult(environment=config.environment, api_url=url)
    vm = vm_for(config, target)
    try:
        records = result.records
        records.append(ensure_local_profile(config, url, auth))
        records.append(install_code(vm, config))
        records.append(copy_blocks(config, url, auth))
        records.append(ensure_work_pools(config, url, auth))
        records.append(ensure_workers(vm, config, auth))
        records.append(deploy(config, url, auth))
        if science_codebase:
            records.append(deploy_science(vm, config, science_codebase))
    finally:
        vm.close()
    create_table_artifact(
        key=f"register-{config.environment}", table=[r.row() for r in result.records]
    )
    return result


@flow(name="canfar-smoke-test")
def smoke_test(
    config: BootstrapConfig = BootstrapConfig(), target: VMTarget | None = None
) -> StepRecord:
    """Launch a headless session from the VM, wait, read its logs, delete it."""
    if target is None:
        target = locate_vm(open_connection(config), config)
    vm = vm_for(config, target)
    try:
        record = canfar_smoke_test(vm, config)
    finally:
        vm.close()
    d = record.details
    verdict = "FAILED" if record.action == Action.BLOCKED else "passed"
    create_markdown_artifact(
        key=f"canfar-smoke-{config.environment}",
        markdown=(
            f"# CANFAR headless smoke test: {verdict}\n\n"
            f"| | |\n|---|---|\n| session | `{record.id or '-'}` |\n"
            f"| status | {d.get('status')} |\n"
            f"| duration | {d.get('seconds')} s |\n| image | `{config.canfar.smoke_test.image}` |\n"
            f"| result | {record.reason} |\n\nLog tail:\n\n```\n{d.get('log_tail') or ''}\n```\n"
        ),
    )
    if record.action == Action.BLOCKED:
        raise BootstrapError(f"CANFAR smoke test {record.reason}")
    return record
