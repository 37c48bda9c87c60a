"""The VM's Prefect database, copied off the cloud.

A copy is made on the VM by SQLite's online backup (Python's ``sqlite3`` backup API, run as the
server's user): consistent while the server keeps writing, and the server is not stopped. It is
checked there (``PRAGMA integrity_check``), compressed, and described by a JSON record (rows per
table, the schema's Alembic revision, its digest, and a digest of the encryption key its blocks
need, never the key). Then it leaves the cloud: to CANFAR's /arc (``backup.destination: arc``,
the default with /arc on; CANFAR storage outlives the loss of the cloud project), where the VM
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
from tasks.prefect_server import SERVER_ENV, SERVER_KEY_ID
from tasks.server_runs import Uses, on_postgresql, server_database
from tasks.service_user import as_service_user
from tasks.vm import VM

#: Tables counted into a copy's record (what an operator looks for in it).


COUNTED = ("flow_run", "deployment", "work_pool", "block_document")


#: Run on the VM as the server's user: ``python3 SCRIPT DATABASE NAME DEST KEEP RECORD`` (DEST
#: empty: the copy stays in a private folder for this machine to fetch; RECORD: the record's
#: fields known beforehand, as JSON). Prints the whole record (``{"missing": …}``: no database).
SNAPSHOT = r"""
import glob, gzip, hashlib, json, os, shutil, sqlite3, sys, tempfile, time
database, name, dest, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
record = json.loads(sys.argv[5])
if not os.path.isfile(database):
    print(json.dumps({"missing": database}))
    sys.exit(0)
# what a run killed mid-way left (a day old: not a run going on now)
for left in glob.glob(os.path.join(os.path.dirname(database), ".sails-*-*")):
    if os.path.getmtime(left) < time.time() - 86400:
        shutil.rmtree(left, ignore_errors=True)
work = tempfile.mkdtemp(prefix=".sails-backup-", dir=os.path.dirname(database))
copy = os.path.join(work, "prefect.db")
source = sqlite3.connect(database, timeout=60)
target = sqlite3.connect(copy)
source.backup(target)
source.close()
check = target.execute("PRAGMA integrity_check").fetchone()[0]
if check != "ok":
    shutil.rmtree(work)
    print(json.dumps({"integrity": check}))
    sys.exit(0)
tables = {r[0] for r in target.execute("SELECT name FROM sqlite_master WHERE type='table'")}
record["counts"] = {t: target.execute("SELECT count(*) FROM " + t).fetchone()[0]
                    for t in COUNTED if t in tables}
if "alembic_version" in tables:
    row = target.execute("SELECT version_num FROM alembic_version").fetchone()
    record["revision"] = row[0] if row else None
target.close()
record["bytes"] = os.path.getsize(copy)

def digest(path, packed):
    h = hashlib.sha256()
    with (gzip.open if packed else open)(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

record["sha256"] = digest(copy, False)
packed = os.path.join(work, name + ".db.gz")
with open(copy, "rb") as raw, gzip.open(packed, "wb", 6) as out:
    shutil.copyfileobj(raw, out, 1 << 20)
os.remove(copy)
record["file"] = packed
if dest:
    os.makedirs(dest, mode=0o700, exist_ok=True)
    final = os.path.join(dest, name + ".db.gz")
    shutil.copyfile(packed, final + ".partial")
    if digest(final + ".partial", True) != record["sha256"]:
        os.remove(final + ".partial")
        shutil.rmtree(work)
        print(json.dumps({"landed": "the copy read back from " + dest + " differs"}))
        sys.exit(0)
    os.chmod(final + ".partial", 0o600)
    os.replace(final + ".partial", final)
    record["file"] = final
    meta = os.path.join(dest, name + ".json")
    with open(meta + ".partial", "w") as f:
        json.dump(record, f, indent=2)
    os.chmod(meta + ".partial", 0o600)
    os.replace(meta + ".partial", meta)
    shutil.rmtree(work)
    copies = sorted(glob.glob(os.path.join(dest, record["environment"] + "-*.db.gz")))
    record["pruned"] = []
    for old in copies[: max(0, len(copies) - keep)]:
        os.remove(old)
        stem = old[: -len(".db.gz")]
        if os.path.exists(stem + ".json"):
            os.remove(stem + ".json")
        record["pruned"].append(os.path.basename(old))
else:
    record["work"] = work
print(json.dumps(record))
"""


#: Run on the VM as root: the id (a digest) of the key the server's blocks are encrypted with.
KEY_ID = (
    f"sed -n 's/^PREFECT_SERVER_ENCRYPTION_KEY=//p' {SERVER_ENV} | tr -d '\\n' | sha256sum "
    "| cut -c1-16"
)


class BackupRecord(BaseModel):
    """One copy of the database: where it is and what it holds."""

    environment: str
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


#: What an operator can do meanwhile for a copy of a server on PostgreSQL.
PG_DUMP_HINT = (
    "`cd / && sudo -u postgres pg_dump -Fc DATABASE > FILE` on the VM (then copy FILE off it), "
    "or a Cinder snapshot of the volume"
)


class OnPostgresError(BootstrapError):
    """The VM's server runs on PostgreSQL: the copies, SQLite's, would not hold its history."""


def runs_on_postgresql(vm: VM, config: BootstrapConfig) -> bool:
    """Whether the VM's Prefect server runs on PostgreSQL, read from the VM (its process, or
    its environment file while it is stopped): in a switch cut off before the server's restart
    it still runs on SQLite. Only what ``vm``'s user cannot read is taken from the config."""
    return on_postgresql(server_database(vm, config), config.prefect.database.kind)


def sqlite_only(vm: VM, config: BootstrapConfig, what: str) -> None:
    """Copies are SQLite's: on PostgreSQL, ``what`` would copy (or put back) the SQLite file a
    switch left behind, not the server's history."""
    refuse_on_postgresql(server_database(vm, config), config, what)


def refuse_on_postgresql(uses: Uses, config: BootstrapConfig, what: str) -> None:
    """``sqlite_only``'s decision, from what the VM shows the server ``uses``."""
    if on_postgresql(uses, config.prefect.database.kind):
        raise OnPostgresError(
            f"{what} copies the SQLite database, and the VM's Prefect server runs on PostgreSQL "
            f"({config.prefect.database.data_directory}); copies of PostgreSQL (pg_dump) are not "
            f"built yet: meanwhile {PG_DUMP_HINT} (nothing was changed)"
        )


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
    """Copy the VM's database off the cloud: to /arc, or (``local``) to this machine. None
    when the VM has no database yet (never configured): nothing to copy."""
    sqlite_only(vm, config, "backup")
    log = logger()
    database = database_path(config)
    # (a VM never configured has neither the database nor the service user to copy it as)
    if not vm.run(f"test -e {shlex.quote(database)}", sudo=vm.privileged, check=False).ok:
        log.info("no Prefect database at %s on %s yet: nothing to copy", database, vm.host)
        return None
    made = stamp()
    name = f"{config.environment}-{made}"
    dest = "" if local else arc_folder(config)
    static = {
        "environment": config.environment,
        "created": made,
        "key_id": key_id(vm, required=False),
    }
    args = [database_path(config), name, dest, str(config.backup.keep), json.dumps(static)]
    script = SNAPSHOT.replace("COUNTED", repr(COUNTED))
    out = vm_python(vm, config, script, args, "the copy of the Prefect database")
    if "missing" in out:
        log.info("no Prefect database at %s on %s yet: nothing to copy", out["missing"], vm.host)
        return None
    if "integrity" in out:
        raise BootstrapError(
            f"SQLite's integrity check of the copy made on {vm.host} failed: {out['integrity']};"
            " the database itself may be damaged (nothing was kept)"
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
    target = folder / f"{name}.db.gz"
    partial = target.with_suffix(".partial")
    logger().info("fetching the copy (%.1f MB uncompressed) from %s", record.bytes / 1e6, vm.host)
    # The copy is the service user's, in its 0700 home: handed to the login user, who fetches
    # it, in a private folder of its own.
    readable = vm.run("mktemp -d").stdout.strip()
    mine = f"{readable}/copy.db.gz"
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
    if sha256_of(partial, packed=True) != record.sha256:
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
    copies = sorted(folder.glob(f"{environment}-*.db.gz"))  # the UTC stamp sorts by age
    gone = []
    for old in copies[: max(0, len(copies) - keep)]:
        old.unlink()
        old.with_name(old.name.removesuffix(".db.gz") + ".json").unlink(missing_ok=True)
        gone.append(old.name)
    return gone


def record_beside(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".db.gz") + ".json")
