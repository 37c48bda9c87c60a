"""A copy of a Prefect server on PostgreSQL (pg_dump's archive) put back.

The archive is checked on the VM before anything changes (its digest against its record, its
table of contents read by ``pg_restore -l``), then loaded into a new database beside the
server's, as the server's role (its extensions made first by the superuser, who owns them):
a copy that does not load leaves nothing behind but its own database, dropped. Only then is the
server stopped and the two databases renamed in one transaction: the server's own kept as
``NAME_before_restore_STAMP``, never dropped. A server that does not become healthy on the copy
gets its own database back.
"""

from __future__ import annotations

import re
import shlex

from core.config import BootstrapConfig
from core.errors import BootstrapError
from tasks.backup import vm_python
from tasks.database import SOCKETS
from tasks.prefect_server import SERVER_UNIT
from tasks.service_user import as_service_user
from tasks.vm import VM

#: Run on the VM as the server's user: ``python3 SCRIPT ARCHIVE SHA256 HOME``. Checks the
#: archive and writes the list pg_restore follows (all but the extensions, which the superuser
#: makes); prints the list's path, its folder and the extensions, or what is wrong.
CHECK = r"""
import hashlib, json, os, re, shutil, subprocess, sys, tempfile
archive, sha256, home = sys.argv[1], sys.argv[2], sys.argv[3]
if not os.path.isfile(archive):
    print(json.dumps({"error": "no backup at " + archive}))
    sys.exit(0)
h = hashlib.sha256()
with open(archive, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
if h.hexdigest() != sha256:
    print(json.dumps({"error": archive + " does not match the digest in its record: damaged"}))
    sys.exit(0)
r = subprocess.run(["pg_restore", "-l", archive], capture_output=True, text=True)
if r.returncode:
    print(json.dumps({"error": archive + ": pg_restore cannot read it: " + r.stderr.strip()}))
    sys.exit(0)
extension = re.compile(r"^\d+; \d+ \d+ (COMMENT - )?EXTENSION (- )?(\S+)")
extensions, kept = [], []
for line in r.stdout.splitlines():
    m = extension.match(line)
    if m is None:
        kept.append(line)
    elif not m.group(1):
        extensions.append(m.group(3))
work = tempfile.mkdtemp(prefix=".sails-restore-", dir=home)
listed = os.path.join(work, "restore.list")
with open(listed, "w") as f:
    f.write("\n".join(kept) + "\n")
print(json.dumps({"list": listed, "work": work, "extensions": extensions}))
"""

_NAME = r"[a-z_][a-z0-9_]*"


def _as_postgres(config: BootstrapConfig, client: str) -> str:
    """A PostgreSQL client command as the superuser through the cluster's local socket (root)."""
    port = config.prefect.database.port
    return f"cd / && runuser -u postgres -- {client} -h {SOCKETS} -p {port}"


def _sql(config: BootstrapConfig, sql: str, database: str = "postgres") -> str:
    """``sql`` in one transaction, as the superuser (root)."""
    psql = _as_postgres(config, "psql -X -q -v ON_ERROR_STOP=1")
    return f"{psql} -d {shlex.quote(database)} -1 -c {shlex.quote(sql)}"


def _drop(config: BootstrapConfig) -> str:
    return _as_postgres(config, "dropdb --if-exists") + f" {restoring_name(config)}"


def restoring_name(config: BootstrapConfig) -> str:
    return f"{config.prefect.database.name}_restoring"


def load_copy(vm: VM, config: BootstrapConfig, archive: str, sha256: str) -> str:
    """The archive at ``archive`` on the VM checked and loaded into a new database beside the
    server's; returns that database's name. A failure drops it and changes nothing else."""
    db = config.prefect.database
    out = vm_python(vm, config, CHECK, [archive, sha256, config.prefect.home], "the check")
    if "error" in out:
        raise BootstrapError(f"{out['error']} (nothing was changed)")
    work = str(out["work"])
    target = restoring_name(config)
    extensions = [e for e in out["extensions"] if re.fullmatch(_NAME, e)]
    try:
        # (a database of this name is a restore's cut off before its rename: never the server's)
        made = _as_postgres(config, f"createdb -O {db.user}") + f" {target}"
        vm.run(f"{_drop(config)} && {made}", sudo=True, timeout=300)
        if extensions:
            sql = "; ".join(f"CREATE EXTENSION IF NOT EXISTS {e}" for e in extensions)
            vm.run(_sql(config, sql, target), sudo=True, timeout=120)
        restore = (
            f"pg_restore -h {SOCKETS} -p {db.port} -U {db.user} -d {target} --no-owner "
            f"--exit-on-error -L {shlex.quote(out['list'])} {shlex.quote(archive)}"
        )
        r = vm.run(as_service_user(config, restore), check=False, timeout=3600)
        if not r.ok:
            drop_loaded(vm, config)
            raise BootstrapError(
                f"{archive} did not load into PostgreSQL on {vm.host}: "
                f"{(r.stderr or r.stdout).strip()[-400:]} (nothing was changed)"
            )
    finally:
        vm.run(f"rm -rf {shlex.quote(work)}", sudo=True, check=False)
    return target


def drop_loaded(vm: VM, config: BootstrapConfig) -> None:
    """The database a copy was loaded into, dropped if it is still there (a restore that ended
    before its rename; after it, the name is gone)."""
    vm.run(_drop(config), sudo=True, check=False)


def _rename(config: BootstrapConfig, renames: list[tuple[str, str]]) -> str:
    """Root's command: the server's database freed of stray sessions, then ``renames`` in one
    transaction."""
    names = ", ".join(f"'{old}'" for old, _ in renames)
    free = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname IN ({names}) AND pid <> pg_backend_pid()"
    )
    moves = "; ".join(f"ALTER DATABASE {old} RENAME TO {new}" for old, new in renames)
    return f"{_sql(config, free)} >/dev/null && {_sql(config, moves)}"


def rename_databases(vm: VM, config: BootstrapConfig, renames: list[tuple[str, str]]) -> None:
    """``renames`` in one transaction, the databases freed of stray sessions (root)."""
    vm.run(_rename(config, renames), sudo=True, timeout=300)


def template_copy(vm: VM, config: BootstrapConfig, copy: str) -> str:
    """A copy of the server's database (the server stopped) named ``copy``; returns its name."""
    db = config.prefect.database
    free = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{db.name}' AND pid <> pg_backend_pid()"
    )
    made = _as_postgres(config, f"createdb -T {db.name} -O {db.user}") + f" {copy}"
    vm.run(f"{_sql(config, free)} >/dev/null && {made}", sudo=True, timeout=3600)
    return copy


def swap_databases(vm: VM, config: BootstrapConfig, loaded: str, when: str) -> str:
    """With the server stopped: its database renamed aside, the loaded copy renamed into its
    place. Returns the name it is kept under."""
    name = config.prefect.database.name
    kept = f"{name}_before_restore_{when.lower()}"
    rename_databases(vm, config, [(name, kept), (loaded, name)])
    return kept


def put_back_database(vm: VM, config: BootstrapConfig, kept: str) -> str:
    """The server's own database back in its place; the copy renamed aside, its name returned."""
    name = config.prefect.database.name
    failed = kept.replace("_before_restore_", "_failed_restore_")
    vm.run(f"systemctl stop {SERVER_UNIT}", sudo=True, timeout=120)
    rename_databases(vm, config, [(name, failed), (kept, name)])
    vm.run(f"systemctl start {SERVER_UNIT}", sudo=True, timeout=120)
    return f"PostgreSQL database {failed}"
