"""The one place the steps become Prefect tasks.

A step in tasks/ is a plain function: it reads, decides, changes what differs and returns a
record; nothing wraps it where it is defined. Here each is wrapped once, under the name its task
runs carry (the names the run logs, the UI, the tests and the bench go by) and with its retries,
timeout and cache policy. The flows call the wrappers from here; code that runs a step inside
another one, or outside any flow, calls the plain function.

``WRAPPERS`` maps each plain step to its task, so a runner handed a plain step finds its task
run: ``submitted`` (provision's: each step a task run, started as soon as its inputs are) and
``timed`` (the bench's: each step in this thread, timed under its task name).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import opaque

from core.errors import retry_transient
from tasks import (
    arc,
    backup,
    canfar,
    code_on_vm,
    first_boot,
    health,
    local_ssh,
    packages,
    postgres,
    prefect_server,
    register,
    service_user,
    smoke,
    sshd,
    ui,
    upgrade,
    venvs,
    vm_server,
    volume_fs,
    workers,
)
from tasks import deploy as deploy_steps
from tasks.cloud import console, floating_ip, keypair, locate, secgroup, server, snapshot, volume
from tasks.cloud import preflight as preflight_steps
from tasks.cloud.converge import Done, Runner, inline
from tasks.vm import STEP_BOUND

P = ParamSpec("P")
R = TypeVar("R")

# Side-effect steps never cache (a cached "create" would silently skip work); transient errors
# retry with exponential backoff and jitter, permanent ones fail at once.
CLOUD_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
#: A step on the VM: retried on transient errors, and bounded as a whole (``STEP_BOUND``).
VM_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_transient,
    "timeout_seconds": STEP_BOUND,
}
#: Never cached, not retried.
UNCACHED: dict[str, Any] = {"cache_policy": NO_CACHE}
#: The operator's SSH alias and known hosts, on this machine: transient errors retried.
LOCAL_SSH_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 3,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_transient,
}

#: Each plain step, and its task.
WRAPPERS: dict[Callable[..., Any], Task[..., Any]] = {}


def _wrap(step: Callable[P, R], name: str, options: Mapping[str, Any]) -> Task[P, R]:
    wrapped: Task[P, R] = task(name=name, **options)(step)
    WRAPPERS[step] = wrapped
    return wrapped


# -- the cloud (provision, teardown, backup) -------------------------------------------------------
preflight = _wrap(preflight_steps.preflight, "preflight", CLOUD_TASK)
ensure_keypair = _wrap(keypair.ensure_keypair, "ensure-keypair", CLOUD_TASK)
ensure_security_group = _wrap(secgroup.ensure_security_group, "ensure-security-group", CLOUD_TASK)
delete_security_group = _wrap(secgroup.delete_security_group, "delete-security-group", CLOUD_TASK)
ensure_server = _wrap(server.ensure_server, "ensure-server", CLOUD_TASK)
delete_server = _wrap(server.delete_server, "delete-server", CLOUD_TASK)
reserve_floating_ip = _wrap(floating_ip.reserve_floating_ip, "reserve-floating-ip", CLOUD_TASK)
ensure_floating_ip = _wrap(floating_ip.ensure_floating_ip, "ensure-floating-ip", CLOUD_TASK)
release_floating_ips = _wrap(floating_ip.release_floating_ips, "release-floating-ips", CLOUD_TASK)
ensure_volume = _wrap(volume.ensure_volume, "ensure-volume", CLOUD_TASK)
ensure_attachment = _wrap(volume.ensure_attachment, "ensure-attachment", CLOUD_TASK)
delete_volume = _wrap(volume.delete_volume, "delete-volume", CLOUD_TASK)
record_fs_uuid = _wrap(volume.record_fs_uuid, "record-filesystem", CLOUD_TASK)
snapshot_volume = _wrap(snapshot.snapshot_volume, "snapshot-volume", CLOUD_TASK)
console_fingerprints = _wrap(console.console_fingerprints, "console-fingerprints", CLOUD_TASK)
locate_vm = _wrap(locate.locate_vm, "locate-vm", CLOUD_TASK)
ensure_local_ssh = _wrap(local_ssh.ensure_local_ssh, "ensure-local-ssh", LOCAL_SSH_TASK)

# -- the VM (configure) ----------------------------------------------------------------------------
wait_for_ssh = _wrap(first_boot.wait_for_ssh, "wait-for-ssh", UNCACHED)
wait_for_cloud_init = _wrap(first_boot.wait_for_cloud_init, "wait-for-cloud-init", VM_TASK)
ensure_packages = _wrap(packages.ensure_packages, "ensure-packages", VM_TASK)
ensure_volume_mounted = _wrap(volume_fs.ensure_volume_mounted, "ensure-volume-mounted", VM_TASK)
ensure_database = _wrap(postgres.ensure_database, "ensure-database", VM_TASK)
ensure_operator_keys = _wrap(sshd.ensure_operator_keys, "ensure-operator-keys", VM_TASK)
ensure_sshd_keepalive = _wrap(sshd.ensure_sshd_keepalive, "ensure-sshd-keepalive", VM_TASK)
ensure_service_user = _wrap(service_user.ensure_service_user, "ensure-service-user", VM_TASK)
ensure_ca_bundle = _wrap(canfar.ensure_ca_bundle, "ensure-ca-bundle", VM_TASK)
ensure_canfar_auth = _wrap(canfar.ensure_canfar_auth, "ensure-canfar-auth", VM_TASK)
ensure_canfar_key = _wrap(arc.ensure_canfar_key, "ensure-canfar-key", VM_TASK)
ensure_arc_mount = _wrap(arc.ensure_arc_mount, "ensure-arc-mount", VM_TASK)
# (not retried: an upgrade that fails has gone back to the version before, and says why)
check_prefect_version = _wrap(upgrade.check_prefect_version, "check-prefect-version", UNCACHED)
ensure_prefect_venv = _wrap(venvs.ensure_prefect_venv, "ensure-prefect-venv", VM_TASK)
ensure_prefect_server = _wrap(
    prefect_server.ensure_prefect_server, "ensure-prefect-server", VM_TASK
)

# -- the VM's Prefect server (register, the smoke test, the UI check) ------------------------------
ensure_local_profile = _wrap(register.ensure_local_profile, "ensure-local-profile", UNCACHED)
install_code = _wrap(code_on_vm.install_code, "install-code-on-vm", VM_TASK)
ensure_code_venv = _wrap(venvs.ensure_code_venv, "ensure-code-venv", VM_TASK)
copy_blocks = _wrap(register.copy_blocks, "copy-blocks-to-vm", UNCACHED)
ensure_work_pools = _wrap(register.ensure_work_pools, "ensure-work-pools", UNCACHED)
ensure_workers = _wrap(workers.ensure_workers, "ensure-workers", VM_TASK)
deploy = _wrap(deploy_steps.deploy, "deploy", UNCACHED)
deploy_science = _wrap(deploy_steps.deploy_science, "deploy-science-codebase", VM_TASK)
canfar_smoke_test = _wrap(smoke.canfar_smoke_test, "canfar-smoke-test", UNCACHED)
run_on_server = _wrap(vm_server.run_on_server, "run-deployment-on-vm", UNCACHED)
capture_ui = _wrap(ui.capture_ui, "capture-ui", UNCACHED)

# -- operating it (the health check, the backup) ---------------------------------------------------
probe_all = _wrap(health.probe_all, "run-probes", UNCACHED)
copy_database = _wrap(backup.copy_database, "copy-database", VM_TASK)


def wrapper(step: Callable[P, R]) -> Task[P, R]:
    """The task of a plain step."""
    try:
        return cast("Task[P, R]", WRAPPERS[step])
    except KeyError:
        raise LookupError(
            f"{step.__module__}.{step.__qualname__} is not wrapped in flows/steps.py"
        ) from None


def submitted(step: Callable[..., Any], *args: Any, wait_for: list[Any] | None = None) -> Any:
    """Each step a task run on the flow's task runner, started as soon as its inputs are.

    Each input is ``opaque``: its future is resolved, but Prefect does not walk into it. The
    observed SDK resources are dicts that build new values on every read, which Prefect's
    walk would take for changes and rebuild as empty resources."""
    return wrapper(step).submit(*(opaque(a) for a in args), wait_for=wait_for or [])


def timed(durations: dict[str, float]) -> Runner:
    """``inline``, noting each step's wall time under its task name."""

    def run(step: Callable[..., Any], *args: Any, wait_for: list[Any] | None = None) -> Done[Any]:
        t0 = time.monotonic()
        try:
            return inline(step, *args)
        finally:
            durations[wrapper(step).name] = time.monotonic() - t0

    return run
