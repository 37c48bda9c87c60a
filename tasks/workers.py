"""The workers: one systemd unit per work pool, running as the service user from the pipeline's
venv (this package's pool from its own), replacing the `screen` sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from core.config import BootstrapConfig
from core.prefect_settings import OWN_POOL, WorkPool
from core.records import Action
from tasks.canfar import VM_CA_BUNDLE, vm_env_path
from tasks.code_on_vm import code_dir
from tasks.drain import drained
from tasks.units import enable_unit, install_unit, unit_active, unit_enabled
from tasks.venvs import code_venv
from tasks.vm import MANAGED, VM, StepRecord, planned
from tasks.vm_server import remote_client

WORKER_UNIT = "prefect-worker@.service"
#: The workers' environment (the API URL and its auth string): the service user's, 0600.
WORKER_ENV = "/etc/sails-bootstrap/prefect-worker.env"


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
    """The pools that get a worker (``workers: 1``)."""
    return [pool.name for pool in pools if pool.workers >= 1]


class UnitState(NamedTuple):
    """What systemd says of a pool's worker unit."""

    enabled: bool
    active: bool


@dataclass(frozen=True)
class WorkersDecision:
    """Pools whose unit to enable, to start (it is not running), to restart once its runs
    end (it runs, but its unit file, environment or venv changed) and to stop and disable once
    its runs end (the pool has ``workers: 0``); ``notes``: the enables and starts, in the
    config's order."""

    enable: list[str]
    start: list[str]
    restart: list[str]
    notes: list[str]
    stop: list[str] = field(default_factory=list)


def decide_workers(
    pools: list[WorkPool],
    units: dict[str, UnitState],
    env_changed: bool,
    unit_changed: bool,
    own_changed: bool = False,
) -> WorkersDecision:
    """What brings each worker pool's unit (``units``, as read) to enabled and running the
    files as now written. ``own_changed``: the drop-in of this package's pool changed, which
    only its worker reads. A pool with ``workers: 0`` has its unit stopped and disabled where
    systemd has it enabled or running."""
    enable, start, restart, notes = [], [], [], []
    stop = [
        p.name
        for p in pools
        if p.workers < 1 and p.name in units and (units[p.name].enabled or units[p.name].active)
    ]
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
    return WorkersDecision(enable, start, restart, notes, stop)


def ensure_workers(
    vm: VM, config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """One systemd worker per pool with ``workers: 1``, replacing the `screen` sessions."""
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
    unit_changed = install_unit(
        vm, f"/etc/systemd/system/{WORKER_UNIT}", worker_unit(config), apply
    )
    own_changed = install_unit(vm, *own_worker_dropin(config), apply)
    if env_changed:
        changes.append("worker environment")
    if unit_changed or own_changed:
        changes.append("worker unit" if unit_changed else f"{OWN_POOL} worker's venv")
    units = {  # read after any reload: what systemd makes of the units now
        name: UnitState(
            unit_enabled(vm, worker_unit_name(name)),
            unit_active(vm, worker_unit_name(name)),
        )
        for name in [pool.name for pool in p.work_pools]
    }
    decision = decide_workers(p.work_pools, units, env_changed, unit_changed, own_changed)
    for name in units if apply else []:
        if name in decision.enable:
            enable_unit(vm, worker_unit_name(name))
        if name in decision.start:
            vm.run(f"systemctl restart {worker_unit_name(name)}", sudo=True)
    changes += decision.notes
    restart, stop = decision.restart, decision.stop
    if (restart or stop) and not apply:
        changes += [f"restarted {name} (once its runs end)" for name in restart]
        changes += [f"stopped {name} (workers: 0; once its runs end)" for name in stop]
    elif restart or stop:  # a worker's restart ends the runs it started: they end first
        with (
            remote_client(url, auth_string) as client,
            drained(client, restart + stop, p.drain_timeout, "the workers", vm) as drain,
        ):
            if restart:
                names = " ".join(map(worker_unit_name, restart))
                vm.run(f"systemctl restart {names}", sudo=True)
            if stop:
                vm.run(
                    f"systemctl disable --now {' '.join(map(worker_unit_name, stop))}", sudo=True
                )
        changes += [f"restarted {name}" for name in restart]
        changes += [f"stopped {name} (workers: 0)" for name in stop]
        if drain.note():
            changes.append(drain.note())
    return StepRecord(
        name="workers",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or "one worker per pool running",
    )
