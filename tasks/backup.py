"""The VM's Prefect database, copied off the cloud.

A copy is made on the VM as the server's user, while the server keeps running: of SQLite by its
online backup (Python's ``sqlite3`` backup API), checked there (``PRAGMA integrity_check``) and
gzipped; of PostgreSQL by ``pg_dump``'s custom format (one consistent snapshot), its archive read
back with ``pg_restore -l``. A JSON record describes it (the database, rows per table, the
schema's Alembic revision, its digest, and a digest of the encryption key its blocks need,
never the key). Then it leaves the cloud: to CANFAR's /arc (``backup.destination: arc``, the
default with /arc on; CANFAR storage outlives the loss of the cloud project), where the VM
writes it and reads it back to check it landed whole; or to this machine (``local``) over the
verified SSH connection. The oldest copies beyond ``backup.keep`` go.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from tasks.access import open_vm
from tasks.arc import vm_path
from tasks.backup_scripts import (
    COPY_END,
    COPY_POSTGRESQL,
    COPY_SQLITE,
    COPY_START,
    SUFFIXES,
    copy_stem,
)
from tasks.database import SOCKETS
from tasks.prefect_server import SERVER_ENV, SERVER_KEY_ID
from tasks.server_runs import on_postgresql, server_database
from tasks.service_user import as_service_user
from tasks.vm import VM

#: Run on the VM as root: the id (a digest) of the key the server's blocks are encrypted with.
KEY_ID = (
    f"sed -n 's/^PREFECT_SERVER_ENCRYPTION_KEY=//p' {SERVER_ENV} | tr -d '\\n' | sha256sum "
    "| cut -c1-16"
)


class BackupRecord(BaseModel):
    """One copy of the database: where it is and what it holds."""

    environment: str
    #: the database copied: "sqlite" (the file, gzipped) or "postgresql" (pg_dump's archive)
    database: str = "sqlite"
    #: on /arc: the path on the VM; local: the path on this machine
    file: str = ""
    created: str
    bytes: int = 0
    sha256: str = ""
    revision: str | None = None
    #: rows per table (flow runs, deployments, work pools, blocks)
    counts: dict[str, int] = Field(default_factory=dict)
    #: which encryption key the copy's blocks need (a digest of it, not the key)
    key_id: str = ""
    #: copies removed for backup.keep
    pruned: list[str] = Field(default_factory=list)
    #: the Cinder snapshot of the volume taken with it (backup.snapshots), and those deleted
    snapshot: str | None = None
    snapshots_pruned: list[str] = Field(default_factory=list)

    def held(self) -> list[str]:
        """What the copy holds, one phrase a table ("19 flow runs")."""
        return [f"{n} {t.replace('_', ' ')}s" for t, n in self.counts.items()]

    def summary(self) -> str:
        return f"{self.file} ({self.bytes / 1e6:.1f} MB; {', '.join(self.held())})"


def runs_on_postgresql(vm: VM, config: BootstrapConfig) -> bool:
    """Whether the VM's Prefect server runs on PostgreSQL, read from the VM (its process, or
    its environment file while it is stopped): in a switch cut off before the server's restart
    it still runs on SQLite. Only what ``vm``'s user cannot read is taken from the config."""
    return on_postgresql(server_database(vm, config), config.prefect.database.kind)


def database_path(config: BootstrapConfig) -> str:
    return f"{config.prefect.home}/prefect.db"


def arc_folder(config: BootstrapConfig) -> str:
    """Where the copies of this environment go on the VM's /arc mount."""
    mount = vm_path(config, config.arc.mount_point)
    return f"{mount}/{config.backup.arc_dir}/{config.environment}"


def vm_python(vm: VM, config: BootstrapConfig, script: str, args: list[str], what: str) -> Any:
    """Run ``script`` with the VM's python3 as the server's user; its last line of output, as
    JSON. (The script goes over SFTP: fabric feeds standard input a byte at a time.)"""
    path = vm.upload(script.encode())
    try:
        quoted = " ".join(shlex.quote(a) for a in [path, *args])
        r = vm.run(
            f'chmod 0755 "$(dirname {shlex.quote(path)})" && chmod 0644 {shlex.quote(path)} && '
            + as_service_user(config, f"python3 {quoted}"),
            timeout=1800,
            check=False,
        )
    finally:
        vm.run(f'rm -rf "$(dirname {shlex.quote(path)})"', check=False)
    return _last_json(r.stdout or r.stderr, what, vm.host)


def key_id(vm: VM, required: bool = True) -> str:
    """The id of the key the VM's server encrypts blocks with ("" when it has none and that is
    not ``required``: a copy is still worth making)."""
    out = vm.run(f"cat {SERVER_KEY_ID} 2>/dev/null || true").stdout.strip()
    if not out and vm.privileged:  # a server configured before the key id was written
        out = vm.run(KEY_ID, sudo=True).stdout.strip()
    if not out or out == hashlib.sha256(b"").hexdigest()[:16]:
        if not required:
            return ""
        raise BootstrapError(
            f"the VM's server has no encryption key in {SERVER_ENV}: run `sails-bootstrap "
            "configure` first"
        )
    return out


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _last_json(out: str, what: str, host: str) -> dict[str, Any]:
    try:
        value = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BootstrapError(f"{what} on {host} failed: {out.strip()[-400:]}") from None
    if not isinstance(value, dict):
        raise BootstrapError(f"{what} on {host} failed: {out.strip()[-400:]}")
    return value


def sha256_of(path: Path, packed: bool = False) -> str:
    """The digest of a file's bytes (``packed``: of what it holds uncompressed)."""
    digest = hashlib.sha256()
    opener = gzip.open if packed else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backup_database(vm: VM, config: BootstrapConfig, local: bool) -> BackupRecord | None:
    """Copy the VM's database (the one its server runs on, read from the VM) off the cloud: to
    /arc, or (``local``) to this machine. None when the VM has no database yet (never
    configured): nothing to copy."""
    log = logger()
    kind = "postgresql" if runs_on_postgresql(vm, config) else "sqlite"
    if kind == "sqlite":
        database = database_path(config)
        # (a VM never configured has neither the database nor the service user to copy it as)
        if not vm.run(f"test -e {shlex.quote(database)}", sudo=vm.privileged, check=False).ok:
            log.info("no Prefect database at %s on %s yet: nothing to copy", database, vm.host)
            return None
        script, extra = COPY_START + COPY_SQLITE + COPY_END, [database]
    else:
        db = config.prefect.database
        script = COPY_START + COPY_POSTGRESQL + COPY_END
        extra = [SOCKETS, str(db.port), db.name, db.user]
    made = stamp()
    name = f"{config.environment}-{made}"
    dest = "" if local else arc_folder(config)
    static = {
        "environment": config.environment,
        "database": kind,
        "created": made,
        "key_id": key_id(vm, required=False),
    }
    args = [config.prefect.home, name, dest, str(config.backup.keep), json.dumps(static)]
    out = vm_python(vm, config, script, [*args, *extra], "the copy of the Prefect database")
    if "missing" in out:
        log.info("no Prefect database at %s on %s yet: nothing to copy", out["missing"], vm.host)
        return None
    if "integrity" in out:
        raise BootstrapError(
            f"{out['integrity']} (made on {vm.host}); the database itself may be damaged "
            "(nothing was kept)"
        )
    if "failed" in out:
        raise BootstrapError(
            f"the copy of the Prefect database on {vm.host} failed: {out['failed']} (nothing "
            "was kept)"
        )
    if "landed" in out:
        raise BootstrapError(f"{out['landed']}: /arc may be stale (`sails-bootstrap remount`)")
    work = out.pop("work", None)
    record = BackupRecord.model_validate(out)
    if local:
        try:
            record = _fetch(vm, config, record, name)
        finally:  # (the service user's folder)
            vm.run(as_service_user(config, f"rm -rf {shlex.quote(str(work))}"), check=False)
    log.info("backup of %s: %s", config.environment, record.summary())
    return record


def _fetch(vm: VM, config: BootstrapConfig, record: BackupRecord, name: str) -> BackupRecord:
    """The copy made on the VM, brought to ``backup.local_dir`` and checked here."""
    folder = _private_dir(config.backup.local_folder(config.environment))
    target = folder / f"{name}{SUFFIXES[record.database]}"
    partial = target.with_suffix(".partial")
    logger().info("fetching the copy (%.1f MB uncompressed) from %s", record.bytes / 1e6, vm.host)
    # The copy is the service user's, in its 0700 home: handed to the login user, who fetches
    # it, in a private folder of its own.
    readable = vm.run("mktemp -d").stdout.strip()
    mine = f"{readable}/copy"
    owner = f"-o {shlex.quote(config.server.user)} " if vm.privileged else ""
    try:
        vm.run(
            f"install -m 0600 {owner}{shlex.quote(record.file)} {shlex.quote(mine)}",
            sudo=vm.privileged,
        )
        vm.download(mine, partial)
    finally:
        vm.run(f"rm -rf {shlex.quote(readable)}", check=False)
    partial.chmod(0o600)
    if sha256_of(partial, packed=target.name.endswith(".gz")) != record.sha256:
        partial.unlink()
        raise BootstrapError(
            f"the copy fetched from {vm.host} differs from the one made there; run it again"
        )
    partial.rename(target)
    record = record.model_copy(update={"file": str(target)})
    meta = folder / f"{name}.json"
    meta.write_text(record.model_dump_json(indent=2) + "\n")
    meta.chmod(0o600)
    return record.model_copy(
        update={"pruned": prune(folder, config.environment, config.backup.keep)}
    )


def copy_database(config: BootstrapConfig, on_vm: bool) -> BackupRecord | None:
    local = config.backup_destination == "local"
    if on_vm and local:
        raise BootstrapError(
            "backup.destination is local (the operator's machine): the VM cannot put a copy "
            "there; run `sails-bootstrap backup` from that machine, or set "
            "backup.destination: arc"
        )
    vm = open_vm(config, on_vm)
    try:
        return backup_database(vm, config, local=local)
    finally:
        vm.close()


def prune(folder: Path, environment: str, keep: int) -> list[str]:
    """Remove the oldest copies of ``environment`` beyond ``keep`` (with their records)."""
    copies = local_copies(folder, environment)
    gone = []
    for old in copies[: max(0, len(copies) - keep)]:
        old.unlink()
        record_beside(old).unlink(missing_ok=True)
        gone.append(old.name)
    return gone


def local_copies(folder: Path, environment: str) -> list[Path]:
    """The copies of ``environment`` in ``folder`` (of either database), oldest first."""
    found = [p for suffix in SUFFIXES.values() for p in folder.glob(f"{environment}-*{suffix}")]
    return sorted(found, key=lambda p: p.name)  # (the UTC stamps sort by age)


def record_beside(path: Path) -> Path:
    return path.with_name(f"{copy_stem(path.name) or path.stem}.json")
