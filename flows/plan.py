"""The whole plan: what provision would change in the cloud and, when the VM is already there,
what configure would change on it and, when its Prefect server runs, what register would change
there. Nothing is written anywhere."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import Action, Record
from flows.configure import configure_host
from flows.provision import provision
from flows.steps import locate_vm
from tasks.access import vm_for
from tasks.cloud import open_connection
from tasks.vm import VM, StepRecord

#: The cloud resources that must already be as configured before the VM itself can be read.
VM_PREREQUISITES = ("server", "floating ip", "volume attachment")


class PlanResult(BaseModel):
    environment: str
    cloud: list[Record] = Field(default_factory=list)
    vm: list[StepRecord] = Field(default_factory=list)
    #: Why the VM was not read (empty when ``vm`` holds its steps).
    vm_note: str = ""
    server: list[StepRecord] = Field(default_factory=list)
    #: Why the VM's Prefect server was not read (empty when ``server`` holds register's steps).
    server_note: str = ""
    #: What `up` does not change but an operator should know (a stale or missing backup).
    notes: list[str] = Field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Something would change, or something blocks the run."""
        rows = [*self.cloud, *self.vm, *self.server]
        return any(r.changed or r.action == Action.BLOCKED for r in rows)


@flow(name="plan")
def plan(config: BootstrapConfig = BootstrapConfig()) -> PlanResult:
    """Say what `up` would change, changing nothing."""
    cloud = provision(config, plan=True)
    result = PlanResult(environment=config.environment, cloud=cloud.records)
    kinds = {r.kind: r.action for r in cloud.records}
    pending = [k for k in VM_PREREQUISITES if kinds.get(k) != Action.KEEP]
    if pending:
        result.vm_note = (
            f"not read: {', '.join(pending)} not in place yet; configure runs every step "
            "once provision has made them"
        )
    else:
        try:  # the VM located once, and one SSH connection for every part of the plan
            target = locate_vm(open_connection(config), config)
        except BootstrapError as exc:
            result.vm_note = f"not read: {exc}"
        else:
            vm = vm_for(config, target)
            try:
                result.vm = configure_host(
                    vm, config, target.volume_id, target.address, True, target.fs_uuid
                ).records
                result.notes += _backup_notes(config, vm)
                _plan_server(config, vm, result)
            except BootstrapError as exc:
                result.vm_note = f"not read: {exc}"
            finally:
                vm.close()
    logger().info(
        "plan for %s: %s",
        config.environment,
        "changes pending" if result.pending or result.vm_note else "nothing to change",
    )
    return result


#: Configure's steps that must be in place before the VM's Prefect server can be read (a
#: database still to be made or switched to: the server that would read it is not there yet).
SERVER_PREREQUISITES = ("database", "prefect version", "prefect venv", "prefect server")


def _plan_server(config: BootstrapConfig, vm: VM, result: PlanResult) -> None:
    """Register's steps in plan mode, when the server they talk to already runs as configured."""
    from flows.register import register_on

    pending = [r.name for r in result.vm if r.name in SERVER_PREREQUISITES and r.changed]
    if pending:
        result.server_note = (
            f"not read: {', '.join(pending)} not in place yet; register runs "
            "every step once configure has started the server"
        )
        return
    try:
        result.server = register_on(vm, config, plan=True).records
    except Exception as exc:  # the plan says why; it never fails for this part
        result.server_note = f"not read: {type(exc).__name__}: {str(exc)[:300]}"


def _backup_notes(config: BootstrapConfig, vm: VM) -> list[str]:
    """The newest backup's age, when it is not fresh (no copy yet, past
    ``backup.max_age_hours``, or not readable): `up` changes nothing about it."""
    from tasks.backup_store import freshness

    try:
        status, detail = freshness(vm, config, on_vm=False)
    except Exception as exc:  # a note, never a reason for the plan to fail
        return [f"backup: age unknown ({type(exc).__name__}: {str(exc)[:200]})"]
    return [] if status == "ok" else [f"backup: {detail}"]
