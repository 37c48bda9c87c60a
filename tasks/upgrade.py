"""A Prefect upgrade of the VM's server with a way back.

A new ``prefect.version`` (or new operators' requirements, ``prefect.requirements``) on a VM
whose server has a database is not installed over the running one. In order:

1. a backup of the database off the VM (/arc, or the operator's machine), the server running;
2. the new venv built beside the old one, at ``VENV-VERSION`` (``-DIGEST`` of the requirements'
   text when there are some), the server running;
3. the pools drained as for any restart, the server and the pipeline's workers stopped;
4. the database kept on the volume as it is (SQLite: its files copied into
   ``before-upgrade-STAMP`` in the Prefect home; PostgreSQL: a copy ``NAME_before_upgrade_STAMP``
   made from it as a template);
5. the database migrated by the new version (``prefect server database upgrade``) with the
   server's own environment (``systemd-run`` with its environment file);
6. ``VENV`` switched to a link to the new venv (the path the operators, the units and their
   deployments use stays the same), the server and workers started, the server's health and its
   version checked.

A failure in 5 or 6 stops the server, puts the kept database back (the migrated one kept aside
as ``failed-upgrade-STAMP`` / ``NAME_failed_upgrade_STAMP``), points ``VENV`` at the old venv
and starts the old version again; the error says why. A failure in 1 or 2 changes nothing the
server uses. A version older than the VM's is refused: Prefect does not migrate a database back.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
from typing import Literal

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.prefect_settings import OWN_POOL
from core.records import Action
from tasks.backup import backup_database, runs_on_postgresql, stamp
from tasks.drain import drained
from tasks.prefect_server import SERVER_ENV, SERVER_UNIT, wait_for_health
from tasks.restore import files_into
from tasks.restore_postgres import rename_databases, template_copy
from tasks.venvs import (
    PIPELINE_LIBRARIES,
    converge_venv,
    installed_requirements,
    requirements_text,
    same_requirements,
    venv_probe,
    versions_code,
    vm_packages,
)
from tasks.vm import VM, StepRecord
from tasks.workers import worker_unit_name

#: A file in each venv this package builds beside the operators' (what it may remove later).
MARK = ".sails-bootstrap-venv"
STEP = "prefect version"


class Observed(BaseModel):
    """The pipeline venv's Prefect (None: no venv, a broken one, or no Prefect in it), whether
    this VM's server has been set up (its environment file is there) and whether the volume
    holds a database."""

    installed: str | None
    server_set_up: bool
    #: A database on the volume (SQLite's file, or a PostgreSQL cluster's data directory).
    history: bool = False
    #: The operators' requirements the venv was built with (None: none).
    requirements: str | None = None


class UpgradeDecision(BaseModel):
    action: Literal["none", "upgrade", "refuse"]
    reason: str = ""


def versioned(config: BootstrapConfig, version: str, requirements: str | None = None) -> str:
    """Where the venv of ``version`` (with ``requirements``, by digest) is built, beside the
    operators' path."""
    text = (requirements or "").strip()
    digest = f"-{hashlib.sha256(text.encode()).hexdigest()[:8]}" if text else ""
    return f"{config.prefect.venv}-{version}{digest}"


def decide_upgrade(seen: Observed, wanted: str, requirements: str | None = None) -> UpgradeDecision:
    """An upgrade only where a server with history runs another version, or the same one with
    other operators' ``requirements``; a missing or broken venv, or a volume with no database
    yet, is the venv step's to make."""
    installed = seen.installed
    same = same_requirements(seen.requirements, requirements)
    if installed is None or (installed == wanted and same):
        return UpgradeDecision(action="none")
    if not seen.server_set_up and not seen.history:
        return UpgradeDecision(action="none")  # nothing to keep: installed in place
    if installed == wanted:
        if not seen.server_set_up:  # its server is not running yet: installed in place
            return UpgradeDecision(action="none")
        return UpgradeDecision(
            action="upgrade", reason=f"Prefect {wanted} with the operators' new requirements"
        )
    try:
        newer = Version(wanted) > Version(installed)
    except InvalidVersion:
        newer = True  # not comparable: the operator named it; treated as a change forward
    if not newer:
        return UpgradeDecision(
            action="refuse",
            reason=(
                f"the VM runs Prefect {installed}, newer than prefect.version {wanted}: its "
                f"database is migrated for {installed} and Prefect does not migrate one back; "
                f"set prefect.version: {installed} (nothing was changed)"
            ),
        )
    if not seen.server_set_up:  # a new VM on a volume with history: its server comes first
        return UpgradeDecision(
            action="refuse",
            reason=(
                f"the volume holds Prefect {installed}'s venv and database, and this VM's server "
                f"is not set up yet: configure with prefect.version: {installed} first (it sets "
                f"the server up on that data), then change the version (nothing was changed)"
            ),
        )
    also = "" if same else " with the operators' new requirements"
    return UpgradeDecision(action="upgrade", reason=f"Prefect {installed} → {wanted}{also}")


def observe(vm: VM, config: BootstrapConfig) -> Observed:
    venv = config.prefect.venv
    probe = vm.run(venv_probe(venv, versions_code(["prefect"])), check=False).stdout.split()
    last = probe[-1].removeprefix("prefect==") if probe else "missing"
    installed = None if last in ("missing", "broken", "none") else last
    env = vm.run(f"test -e {SERVER_ENV}", sudo=True, check=False).ok
    sqlite = shlex.quote(f"{config.prefect.home}/prefect.db")
    cluster = shlex.quote(f"{config.prefect.database.data_directory}/PG_VERSION")
    data = vm.run(f"test -s {sqlite} || test -e {cluster}", sudo=True, check=False).ok
    return Observed(
        installed=installed,
        server_set_up=env,
        history=data,
        requirements=installed_requirements(vm, venv),
    )


def check_prefect_version(
    vm: VM,
    config: BootstrapConfig,
    secret: dict[str, str],
    wanted: str,
    apply: bool = True,
) -> StepRecord:
    """The VM's server at ``wanted``: upgraded with a way back when it runs an older one."""
    seen = observe(vm, config)
    requirements = requirements_text(config.prefect.requirements)
    decision = decide_upgrade(seen, wanted, requirements)
    if decision.action == "none":
        reason = f"Prefect {seen.installed}" if seen.installed else "no venv yet"
        return StepRecord(name=STEP, applied=apply, reason=reason)
    if decision.action == "refuse":
        return StepRecord(name=STEP, action=Action.BLOCKED, applied=False, reason=decision.reason)
    new = versioned(config, wanted, requirements)
    if not apply:
        return StepRecord(
            name=STEP,
            action=Action.CHANGE,
            applied=False,
            reason=(
                f"pending: upgrade {decision.reason}: a backup first, a new venv at {new}, the "
                "runs in flight drained, the database migrated, the venv switched (the old one "
                "and the database as it was kept for a way back)"
            ),
        )
    assert seen.installed is not None  # (an upgrade is from a version)
    done = upgrade(vm, config, secret, seen.installed, wanted, new, decision.reason)
    return StepRecord(name=STEP, action=Action.CHANGE, applied=True, reason=done)


def _pipeline_workers(vm: VM) -> list[str]:
    """The running workers that run from the pipeline's venv (not this package's pool's)."""
    out = vm.run(
        "systemctl list-units --type=service --state=active --plain --no-legend "
        "'prefect-worker@*' | awk '{print $1}'",
        check=False,
    ).stdout.split()
    return [u for u in out if u != worker_unit_name(OWN_POOL)]


def _keep_database(vm: VM, config: BootstrapConfig, on_postgresql: bool, when: str) -> str:
    """The database as it is, kept on the volume (the server stopped); returns where."""
    if on_postgresql:
        name = f"{config.prefect.database.name}_before_upgrade_{when.lower()}"
        return template_copy(vm, config, name)
    kept = f"{config.prefect.home}/before-upgrade-{when}"
    vm.run(f"set -e; {files_into(config, shlex.quote(kept), 'cp -a')}", sudo=True, timeout=1800)
    return kept


def _put_back_database(vm: VM, config: BootstrapConfig, on_postgresql: bool, kept: str) -> str:
    """The kept database back in its place (the server stopped); returns where the migrated one
    went."""
    if on_postgresql:
        name = config.prefect.database.name
        failed = kept.replace("_before_upgrade_", "_failed_upgrade_")
        rename_databases(vm, config, [(name, failed), (kept, name)])
        return f"PostgreSQL database {failed}"
    home = shlex.quote(config.prefect.home)
    failed = kept.replace("/before-upgrade-", "/failed-upgrade-")
    q = shlex.quote(kept)
    vm.run(
        f"set -e; {files_into(config, shlex.quote(failed))}; "
        f'for x in {q}/prefect.db*; do [ ! -e "$x" ] || cp -a "$x" {home}/; done',
        sudo=True,
        timeout=1800,
    )
    return failed


def _migrate(vm: VM, config: BootstrapConfig, venv: str) -> None:
    """The database migrated by ``venv``'s Prefect, as the server's user with its environment."""
    unit = f"sails-prefect-migrate-{stamp().lower()}"
    r = vm.run(
        f"systemd-run --quiet --wait --pipe --collect --unit={unit} "
        f"-p User={shlex.quote(config.prefect.user)} -p EnvironmentFile={SERVER_ENV} "
        f"-p WorkingDirectory={shlex.quote(config.prefect.home)} "
        f"{shlex.quote(venv)}/bin/prefect server database upgrade -y",
        sudo=True,
        check=False,
        timeout=3600,
    )
    if not r.ok:
        lines = [ln.strip() for ln in (r.stdout + "\n" + r.stderr).splitlines() if ln.strip()]
        # the exception's own line (SQLAlchemy follows it with the SQL and a link)
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
        why = errors[-1] if errors else " | ".join(lines[-3:])
        raise BootstrapError(f"the migration failed: {why[:400]}")


def _switch(vm: VM, config: BootstrapConfig, target: str) -> str:
    """``VENV`` pointed at ``target`` (a directory of its own is moved to ``VENV.previous``);
    returns how to point it back: the old link's target, or "" for the moved directory."""
    v = shlex.quote(config.prefect.venv)
    t = shlex.quote(target)
    r = vm.run(
        f"set -e; if [ -L {v} ]; then readlink {v}; else rm -rf {v}.previous; "
        f"mv {v} {v}.previous; fi; ln -sfn {t} {v}.link; mv -T {v}.link {v}",
        sudo=True,
    )
    return r.stdout.strip()


def _switch_back(vm: VM, config: BootstrapConfig, previous: str) -> None:
    v = shlex.quote(config.prefect.venv)
    if previous:
        cmd = f"ln -sfn {shlex.quote(previous)} {v}.link && mv -T {v}.link {v}"
    else:
        cmd = f"rm -f {v} && mv {v}.previous {v}"
    vm.run(cmd, sudo=True)


def _prune(vm: VM, config: BootstrapConfig, keep: list[str]) -> None:
    """This package's older venvs beside the operators' path, but the two in ``keep``."""
    venv = config.prefect.venv
    kept = " ".join(shlex.quote(k) for k in keep if k)
    vm.run(
        f'for d in {shlex.quote(venv)}-*; do [ -f "$d/{MARK}" ] || continue; '
        f'case " {kept} " in *" $d "*) ;; *) rm -rf "$d" ;; esac; done',
        sudo=True,
        check=False,
        timeout=600,
    )


def upgrade(
    vm: VM,
    config: BootstrapConfig,
    secret: dict[str, str],
    installed: str,
    wanted: str,
    new: str,
    what: str,
) -> str:
    """Steps 1 to 6 of the module's docstring, the new venv at ``new`` (``what``: the
    decision's words, "Prefect OLD → NEW"); returns what was done."""
    from tasks.vm_server import remote_client

    log = logger()
    pg = runs_on_postgresql(vm, config)
    log.info("upgrading to %s: a backup first", what)
    packages = [f"prefect=={wanted}", *vm_packages(PIPELINE_LIBRARIES)]
    try:
        copy = backup_database(vm, config, local=config.backup_destination == "local")
        converge_venv(vm, config, "prefect venv", new, packages, config.prefect.requirements)
    except BootstrapError as exc:
        vm.run(f"rm -rf {shlex.quote(new)}", sudo=True, check=False)  # (nothing uses it)
        raise BootstrapError(
            f"the upgrade to {what} stopped before anything was switched: {exc}. "
            f"Prefect {installed} runs on, unchanged"
        ) from None
    copy_name = copy.file if copy else "none (no database yet)"
    vm.run(f"touch {shlex.quote(new)}/{MARK}", check=False)
    auth = secret["auth_string"] if config.prefect.api_auth else None
    url = f"http://127.0.0.1:{config.prefect.port}/api on the VM"
    when = stamp()
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(vm.api(config.prefect.port))
        client = stack.enter_context(remote_client(f"{base}/api", auth))
        pools = [p.name for p in config.prefect.work_pools]
        drain = stack.enter_context(
            drained(client, pools, config.prefect.drain_timeout, "the Prefect server", vm)
        )
        workers = _pipeline_workers(vm)
        units = " ".join([SERVER_UNIT, *workers])
        vm.run(f"systemctl stop {units}", sudo=True, timeout=120)
        kept = _keep_database(vm, config, pg, when)
        previous: str | None = None
        try:
            log.info("migrating the database with Prefect %s", wanted)
            _migrate(vm, config, new)
            previous = _switch(vm, config, new)
            vm.run(f"systemctl start {units}", sudo=True, timeout=120)
            wait_for_health(f"{base}/api", timeout=300, shown=url)
            running = client.api_version()
            if running != wanted:
                raise BootstrapError(f"the server reports version {running}, not {wanted}")
        except Exception as exc:
            why = str(exc) if isinstance(exc, BootstrapError) else f"{type(exc).__name__}: {exc}"
            log.error("the upgrade to %s failed (%s): back to %s", what, why, installed)
            vm.run(f"systemctl stop {units}", sudo=True, timeout=120, check=False)
            failed = _put_back_database(vm, config, pg, kept)
            if previous is not None:
                _switch_back(vm, config, previous)
            vm.run(f"systemctl start {units}", sudo=True, timeout=120)
            wait_for_health(f"{base}/api", timeout=300, shown=url)
            raise BootstrapError(
                f"the upgrade to {what} failed ({why}). Prefect "
                f"{installed} runs again on its database as it was before the upgrade; the one "
                f"the new version touched is kept at {failed}, its venv at {new}, and the backup "
                f"made first is {copy_name}"
            ) from None
        note = drain.note()
    _prune(vm, config, [new, previous or ""])
    done = (
        f"upgraded to {what} (backup first: {copy_name}; the database as it "
        f"was kept at {kept}; the old venv kept at {previous or config.prefect.venv + '.previous'})"
    )
    log.info("%s", done)
    return done + (f"; {note}" if note else "")
