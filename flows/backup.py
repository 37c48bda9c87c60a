"""The orchestration history off the cloud and back: ``backup`` copies the VM's Prefect
database to /arc or to this machine (also on the VM's schedule), ``restore`` puts a copy back
(tasks/backup.py, tasks/backup_store.py and tasks/restore.py say how)."""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from flows.steps import copy_database, snapshot_volume
from tasks.access import open_vm
from tasks.backup import BackupRecord, key_id, runs_on_postgresql, stamp
from tasks.backup_scripts import copy_stem
from tasks.backup_store import find_backup
from tasks.cloud import open_connection
from tasks.cloud.locate import locate_vm
from tasks.drain import drained
from tasks.prefect_server import SERVER_UNIT, server_secrets
from tasks.restore import RestoreRecord, put_back, start_on_copy, swap_database, unpack_on_vm
from tasks.restore_postgres import drop_loaded, load_copy, put_back_database, swap_databases
from tasks.vm_lock import vm_exclusive
from tasks.vm_server import remote_client


@flow(name="backup")
def backup(config: BootstrapConfig = BootstrapConfig(), on_vm: bool = False) -> BackupRecord | None:
    """Copy the VM's Prefect database (every flow run, deployment, pool and block) off the
    cloud; the server keeps running. None: the VM has no database yet."""
    record = copy_database(config, on_vm)
    if record is None:
        return None
    if config.backup.snapshots:
        conn = open_connection(config)
        volume_id = locate_vm(conn, config).volume_id
        if volume_id:
            name = copy_stem(record.file.rsplit("/", 1)[-1]) or record.created
            snap = snapshot_volume(conn, config, volume_id, name)
            record = record.model_copy(update={"snapshot": name, "snapshots_pruned": snap.pruned})
    where = "on the VM" if config.backup_destination == "arc" else "on the machine that ran it"
    create_markdown_artifact(
        key=f"backup-{config.environment}",
        markdown=(
            f"# Backup of {config.environment}\n\n"
            f"- file ({where}): `{record.file}`\n"
            f"- database: {record.database}; made: {record.created}, "
            f"{record.bytes / 1e6:.1f} MB{' uncompressed' if record.database == 'sqlite' else ''}, "
            f"sha256 {record.sha256[:16]}…\n"
            + "".join(f"- {line}\n" for line in record.held())
            + f"- older copies removed: {', '.join(record.pruned) or 'none'}\n"
            + (
                f"- Cinder snapshot of the volume: `{record.snapshot}` (older ones deleted: "
                f"{', '.join(record.snapshots_pruned) or 'none'})\n"
                if record.snapshot
                else ""
            )
            + "\n"
            "Put it back with `sails-bootstrap restore --config FILE --from "
            f"{copy_stem(record.file.rsplit('/', 1)[-1])}`.\n"
        ),
    )
    return record


@flow(name="restore")
def restore(
    config: BootstrapConfig = BootstrapConfig(), source: str | None = None
) -> RestoreRecord:
    """Put a backup (``source``: a file here, a name, or the newest when empty) in place of the
    VM's Prefect database. The runs in flight end first; the database it replaces is kept on
    the VM; a server that does not start on the copy gets its own database back."""
    log = logger()
    vm = open_vm(config, on_vm=False)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(vm_exclusive(vm, config, "restore"))
            kind = "postgresql" if runs_on_postgresql(vm, config) else "sqlite"
            record, here = find_backup(vm, config, source)
            if record.database != kind:
                raise BootstrapError(
                    f"{record.file} is a copy of {record.database}, and the VM's Prefect server "
                    f"runs on {kind} (prefect.database.kind): restore a copy made on {kind}, or "
                    f"configure the server back onto {record.database} first (nothing was "
                    "changed)"
                )
            log.info("restoring %s from %s", config.environment, record.summary())
            if not record.key_id:
                raise BootstrapError(
                    f"{record.file} was made while the VM's server had no encryption key, so "
                    "which key its blocks need is not known; restore a backup made after "
                    "`configure` set the server up (nothing was changed)"
                )
            if key_id(vm) != record.key_id:
                raise BootstrapError(
                    f"the VM's server runs with another encryption key than the one that "
                    f"encrypted the blocks in {record.file}; restored, they could not be read. "
                    "Restore a backup made since the server's key last changed (nothing was "
                    "changed)"
                )
            packed = vm.upload(Path(record.file).read_bytes()) if here else record.file
            if here:  # handed to the service user, who unpacks it
                folder = f'"$(dirname {shlex.quote(packed)})"'
                stack.callback(vm.run, f"rm -rf {folder}", sudo=True, check=False)
                user = shlex.quote(config.prefect.user)
                vm.run(f"chown -R {user}:{user} {folder}", sudo=True)
            if kind == "sqlite":
                unpacked, work = unpack_on_vm(vm, config, packed, record.sha256)
                stack.callback(vm.run, f"rm -rf {shlex.quote(work)}", sudo=True, check=False)
            else:  # loaded beside the server's database while it keeps running
                loaded = load_copy(vm, config, packed, record.sha256)
                stack.callback(drop_loaded, vm, config)
            secret = server_secrets(config, host=vm)
            base = stack.enter_context(vm.api(config.prefect.port))
            auth = secret["auth_string"] if config.prefect.api_auth else None
            client = stack.enter_context(remote_client(f"{base}/api", auth))
            pools = [p.name for p in config.prefect.work_pools]
            drain = stack.enter_context(
                drained(client, pools, config.prefect.drain_timeout, "the Prefect server", vm)
            )
            vm.run(f"systemctl stop {SERVER_UNIT}", sudo=True, timeout=120)
            if kind == "sqlite":
                kept = swap_database(vm, config, unpacked, stamp())
                start_on_copy(vm, config, base, lambda: put_back(vm, config, kept))
            else:
                name = swap_databases(vm, config, loaded, stamp())
                kept = f"PostgreSQL database {name}"
                start_on_copy(vm, config, base, lambda: put_back_database(vm, config, name))
        done = RestoreRecord(
            environment=config.environment,
            file=record.file,
            created=record.created,
            kept=kept,
            counts=record.counts,
            drain=drain.note(),
        )
    finally:
        vm.close()
    create_markdown_artifact(
        key=f"restore-{config.environment}",
        markdown=(
            f"# Restore of {config.environment}\n\n"
            f"- from: `{done.file}` (made {done.created})\n"
            + "".join(f"- {line}\n" for line in record.held())
            + f"- the database it replaced: `{done.kept}` on the VM\n"
            + (f"- runs in flight: {done.drain}\n" if done.drain else "")
        ),
    )
    log.info("restored %s; the database before is kept at %s", config.environment, kept)
    return done
