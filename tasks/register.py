"""Register the orchestration server's parts: the local profile, the blocks the deployments need,
the work pools and their workers (systemd units running as the service user)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.config import BootstrapConfig
from core.log import logger
from core.records import Action
from core.settings import OWN_POOL, WorkPool
from tasks.canfar import VM_CA_BUNDLE, vm_env_path
from tasks.cloud import cloud_credentials
from tasks.code_on_vm import code_dir, vm_config
from tasks.drain import drained
from tasks.venvs import code_venv
from tasks.vm import MANAGED, VM, VM_TASK, StepRecord, planned
from tasks.vm_server import remote_client, remove_private_keys, save_remote

WORKER_UNIT = "prefect-worker@.service"


WORKER_ENV = "/etc/sails-bootstrap/prefect-worker.env"


@task(name="ensure-local-profile", cache_policy=NO_CACHE)
def ensure_local_profile(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """A Prefect profile named after the environment, pointing at the VM's API."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles(include_defaults=False)
    wanted: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        wanted[PREFECT_API_AUTH_STRING] = auth_string
    existing = profiles.profiles_by_name.get(config.environment)
    same = existing is not None and all(existing.settings.get(k) == v for k, v in wanted.items())
    if not same and apply:
        profiles.update_profile(config.environment, wanted)
        save_profiles(profiles)
    if auth_string and apply:  # the file now holds the auth string: owner only
        from prefect.settings import PREFECT_PROFILES_PATH

        path = Path(str(PREFECT_PROFILES_PATH.value())).expanduser()
        if path.exists():
            path.chmod(0o600)
    return StepRecord(
        name=f"profile {config.environment}",
        action=Action.KEEP if same else (Action.CHANGE if existing else Action.CREATE),
        applied=apply,
        reason=("" if apply or same else "pending: ")
        + f"`prefect profile use {config.environment}` talks to {url} "
        f"(while `ssh -N {config.ssh.alias}` forwards it)",
    )


@task(name="copy-blocks-to-vm", cache_policy=NO_CACHE)
def copy_blocks(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """Save the blocks the deployments need on the VM's server (secrets carried, never shown)."""
    from prefect.blocks.system import Secret

    from blocks import CanfarCredentials

    remote = vm_config(config)
    cloud, made = vm_cloud_credentials(config, cloud_credentials(config), apply)
    blocks: list[tuple[Any, str]] = [
        (Secret.load(config.prefect.auth_block), config.prefect.auth_block),
    ]
    if cloud is not None:  # None: one to make (plan mode), so not yet there to compare
        blocks.insert(0, (cloud, str(remote.cloud.credentials_block)))
    try:
        blocks.append(
            (
                CanfarCredentials.load(config.canfar.credentials_block),
                config.canfar.credentials_block,
            )
        )
    except ValueError:
        logger().warning("no CanfarCredentials block %r to copy", config.canfar.credentials_block)
    blocks = [(for_vm(b), n) for b, n in blocks]
    saved = save_remote(blocks, url, auth_string, apply)
    kept = [name for _, name in blocks if name not in saved]
    changes = [f"saved {', '.join(saved)}"] if saved else []
    if made:
        changes.append(f"made the application credential {vm_credential_name(config)} for the VM")
        if cloud is None:
            changes.append(f"saved {remote.cloud.credentials_block}")
    if remove_private_keys(url, auth_string, apply):
        changes.append("removed the SSH private key an earlier version put there")
    reason = planned(changes, apply)
    if kept:
        reason += ("; " if reason else "") + f"{', '.join(kept)} as they should be"
    return StepRecord(
        name="blocks on the VM server",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=reason,
    )


def for_vm(block: Any) -> Any:
    """The block as the VM gets it: a CA file is a path on this machine; on the VM, the bundle
    configure wrote (the system's CAs plus config.ca_bundle) takes its place."""
    from blocks import CanfarCredentials, OpenStackCredentials

    ca_fields: dict[type, str] = {OpenStackCredentials: "cacert", CanfarCredentials: "ca_bundle"}
    field = ca_fields.get(type(block))
    if field and getattr(block, field):
        return block.model_copy(update={field: VM_CA_BUNDLE})
    return block


def vm_credential_name(config: BootstrapConfig) -> str:
    """The Keystone application credential the VM uses when the operator's are a password."""
    return f"sails-{config.environment}-vm"


def vm_cloud_credentials(
    config: BootstrapConfig, cloud: Any, apply: bool = True
) -> tuple[Any | None, bool]:
    """What the VM gets to reach the cloud: never a password. An application credential is
    copied; for a password, the VM's own application credential, kept here as the block
    ``ENV-vm-cloud`` so that later runs reuse it instead of making another. With
    ``apply=False``, Keystone is only read: ``(None, True)`` when one would be made."""
    from blocks import OpenStackCredentials

    local = f"{config.environment}-vm-cloud"
    try:
        kept = OpenStackCredentials.load(local)
    except ValueError:
        kept = None
    if not apply:
        name = vm_credential_name(config)
        if not cloud.delegated_is_current(name, kept, config.environment):
            return None, True
        return (cloud if cloud.auth_type == "v3applicationcredential" else kept), False
    creds, made = cloud.delegated(vm_credential_name(config), kept, config.environment)
    if made:
        creds.save(local, overwrite=True)
        logger().info(
            "made the application credential %s for the VM (kept as block %s)",
            vm_credential_name(config),
            local,
        )
    return creds, made


@dataclass(frozen=True)
class PoolChange:
    """One pool to create (``create``) and/or whose concurrency limit to set (``limit``, from
    ``was``); a pool as configured gets none."""

    name: str
    create: bool
    set_limit: bool
    was: int | None
    limit: int | None

    def notes(self) -> list[str]:
        return ([f"created {self.name}"] if self.create else []) + (
            [f"{self.name} limit {self.was} -> {self.limit}"] if self.set_limit else []
        )


def decide_work_pools(wanted: list[WorkPool], listed: dict[str, int | None]) -> list[PoolChange]:
    """The changes, in the config's order, that bring the server's pools (``listed``: name:
    concurrency limit) to ``wanted``. A missing pool is created without a limit, then given
    its limit if it has one; pools not configured are left alone."""
    out = []
    for pool in wanted:
        create = pool.name not in listed
        was = None if create else listed[pool.name]
        if create or was != pool.concurrency:
            out.append(
                PoolChange(pool.name, create, was != pool.concurrency, was, pool.concurrency)
            )
    return out


@task(name="ensure-work-pools", cache_policy=NO_CACHE)
def ensure_work_pools(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

    changes = []
    with remote_client(url, auth_string) as client:
        # The listing is what the UI and `prefect work-pool ls` show; a limit given only at
        # creation does not always appear there, so limits are set (and checked) by update.
        listed = {p.name: p.concurrency_limit for p in client.read_work_pools()}
        for change in decide_work_pools(config.prefect.work_pools, listed):
            if change.create and apply:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=change.name,
                        type="process",
                        description=f"{config.environment}: {change.name}",
                    )
                )
            if change.set_limit and apply:
                client.update_work_pool(change.name, WorkPoolUpdate(concurrency_limit=change.limit))
            changes += change.notes()
    return StepRecord(
        name="work pools",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply)
        or ", ".join(f"{p.name}({p.concurrency or '-'})" for p in config.prefect.work_pools),
    )


def worker_unit(config: BootstrapConfig) -> str:
    p = config.prefect
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=Prefect worker for pool %i\n"
        "After=prefect-server.service network-online.target\n"
        "Wants=prefect-server.service\n"
        f"RequiresMountsFor={p.venv}\n"
        "[Service]\n"
        f"User={config.prefect.user}\n"
        f"EnvironmentFile={WORKER_ENV}\n"
        f"EnvironmentFile=-{vm_env_path(config)}\n"
        f"WorkingDirectory={code_dir(config)}\n"
        f"ExecStart={p.venv}/bin/prefect worker start --pool %i --type process\n"
        "KillSignal=SIGINT\n"
        "TimeoutStopSec=30\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def own_worker_dropin(config: BootstrapConfig) -> tuple[str, str]:
    """The drop-in that runs the worker of this package's pool from this package's venv."""
    venv = code_venv(config)
    path = f"/etc/systemd/system/prefect-worker@{OWN_POOL}.service.d/sails-venv.conf"
    return path, (
        f"{MANAGED}\n"
        "[Unit]\n"
        f"RequiresMountsFor={venv}\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={venv}/bin/prefect worker start --pool %i --type process\n"
    )


def worker_unit_name(pool: str) -> str:
    return f"prefect-worker@{pool}.service"


def worker_pools(pools: list[WorkPool]) -> list[str]:
    """The pools that get a worker (one unit, for any ``workers`` of 1 or more)."""
    return [pool.name for pool in pools if pool.workers >= 1]


class UnitState(NamedTuple):
    """What systemd says of a pool's worker unit."""

    enabled: bool
    active: bool


@dataclass(frozen=True)
class WorkersDecision:
    """Pools whose unit to enable, to start (it is not running) and to restart once its runs
    end (it runs, but its unit file, environment or venv changed); ``notes``: the enables and
    starts, in the config's order."""

    enable: list[str]
    start: list[str]
    restart: list[str]
    notes: list[str]


def decide_workers(
    pools: list[WorkPool],
    units: dict[str, UnitState],
    env_changed: bool,
    unit_changed: bool,
    own_changed: bool = False,
) -> WorkersDecision:
    """What brings each worker pool's unit (``units``, as read) to enabled and running the
    files as now written. ``own_changed``: the drop-in of this package's pool changed, which
    only its worker reads. A pool with no worker is left as it is."""
    enable, start, restart, notes = [], [], [], []
    for name in worker_pools(pools):
        state = units[name]
        if not state.enabled:
            enable.append(name)
            notes.append(f"enabled {name}")
        if not state.active:
            start.append(name)
            notes.append(f"started {name}")
        elif env_changed or unit_changed or (own_changed and name == OWN_POOL):
            restart.append(name)
    return WorkersDecision(enable, start, restart, notes)


@task(name="ensure-workers", **VM_TASK)
def ensure_workers(
    vm: VM, config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """One systemd worker per pool (per configured count), replacing the `screen` sessions."""
    p = config.prefect
    env = [
        f"PREFECT_API_URL=http://127.0.0.1:{p.port}/api",
        f"PREFECT_HOME={p.home}",
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "DO_NOT_TRACK=1",
        f"SSL_CERT_FILE={VM_CA_BUNDLE}",
    ]
    if auth_string and p.api_auth:
        env.append(f"PREFECT_API_AUTH_STRING={auth_string}")
    changes = []
    # It holds the auth string: the pipeline's user alone reads it (systemd reads it as root,
    # and `deploy_science` sources it as that user).
    user = config.prefect.user
    env_changed = vm.write_file(
        WORKER_ENV, "\n".join(env) + "\n", mode="0600", owner=f"{user}:{user}", apply=apply
    )
    dropin, dropin_text = own_worker_dropin(config)
    unit_changed = vm.write_file(
        f"/etc/systemd/system/{WORKER_UNIT}", worker_unit(config), apply=apply
    )
    if apply:
        vm.run(f"mkdir -p {shlex.quote(dropin.rsplit('/', 1)[0])}", sudo=True)
    own_changed = vm.write_file(dropin, dropin_text, apply=apply)
    if env_changed:
        changes.append("worker environment")
    if unit_changed or own_changed:
        if apply:
            vm.run("systemctl daemon-reload", sudo=True)
        changes.append("worker unit" if unit_changed else f"{OWN_POOL} worker's venv")
    units = {  # read after any reload: what systemd makes of the units now
        name: UnitState(
            vm.run(f"systemctl is-enabled --quiet {worker_unit_name(name)}", check=False).ok,
            vm.run(f"systemctl is-active --quiet {worker_unit_name(name)}", check=False).ok,
        )
        for name in worker_pools(p.work_pools)
    }
    decision = decide_workers(p.work_pools, units, env_changed, unit_changed, own_changed)
    for name in units if apply else []:
        if name in decision.enable:
            vm.run(f"systemctl enable {worker_unit_name(name)}", sudo=True)
        if name in decision.start:
            vm.run(f"systemctl restart {worker_unit_name(name)}", sudo=True)
    changes += decision.notes
    restart = decision.restart
    if restart and not apply:
        changes += [f"restarted {name} (once its runs end)" for name in restart]
    elif restart:  # a worker's restart ends the runs it started: they end first
        with (
            remote_client(url, auth_string) as client,
            drained(client, restart, p.drain_timeout, "the workers", vm) as drain,
        ):
            vm.run(f"systemctl restart {' '.join(map(worker_unit_name, restart))}", sudo=True)
        changes += [f"restarted {name}" for name in restart]
        if drain.note():
            changes.append(drain.note())
    return StepRecord(
        name="workers",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or "one worker per pool running",
    )
