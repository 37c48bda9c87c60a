"""A copy put back on the VM.

A restore checks the copy before it touches the server: its environment, the server's key (a
copy whose blocks need another key would leave them unreadable), its digest and SQLite's
integrity check on the VM. Then the pools are drained, the server stopped, its database moved
aside (kept, never deleted), the copy put in its place and the server started; Prefect migrates
an older schema on start. A server that does not become healthy on the copy gets its own
database back.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from pydantic import BaseModel, Field

from core.config import BootstrapConfig
from core.errors import BootstrapError
from tasks.backup import database_path, vm_python
from tasks.prefect_server import SERVER_UNIT, wait_for_health
from tasks.vm import VM

#: Run on the VM as the server's user: ``python3 SCRIPT PACKED SHA256 HOME``. Unpacks a copy into a
#: private folder of the Prefect home and checks it; prints where it is, or what is wrong.
UNPACK = r"""
import gzip, hashlib, json, os, shutil, sqlite3, sys, tempfile
packed, sha256, home = sys.argv[1], sys.argv[2], sys.argv[3]
if not os.path.isfile(packed):
    print(json.dumps({"error": "no backup at " + packed}))
    sys.exit(0)
work = tempfile.mkdtemp(prefix=".sails-restore-", dir=home)
plain = os.path.join(work, "prefect.db")
h = hashlib.sha256()
try:
    with gzip.open(packed, "rb") as f, open(plain, "wb") as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            out.write(block)
except (OSError, EOFError) as exc:
    shutil.rmtree(work)
    print(json.dumps({"error": packed + " cannot be unpacked (" + str(exc) + "): damaged"}))
    sys.exit(0)
if h.hexdigest() != sha256:
    shutil.rmtree(work)
    print(json.dumps({"error": packed + " does not match the digest in its record: damaged"}))
    sys.exit(0)
with sqlite3.connect(plain) as db:
    check = db.execute("PRAGMA integrity_check").fetchone()[0]
if check != "ok":
    shutil.rmtree(work)
    print(json.dumps({"error": packed + ": SQLite's integrity check failed: " + check}))
    sys.exit(0)
os.chmod(plain, 0o600)
print(json.dumps({"path": plain, "work": work}))
"""


class RestoreRecord(BaseModel):
    environment: str
    file: str
    created: str
    #: where the database the server ran with before was moved to, on the VM
    kept: str
    counts: dict[str, int] = Field(default_factory=dict)
    drain: str = ""


def unpack_on_vm(vm: VM, config: BootstrapConfig, packed: str, sha256: str) -> tuple[str, str]:
    """The copy at ``packed`` on the VM, unpacked into the Prefect home and checked; returns
    (the unpacked file, its private folder)."""
    args = [packed, sha256, config.prefect.home]
    out = vm_python(vm, config, UNPACK, args, "unpacking the backup")
    if "error" in out:
        raise BootstrapError(f"{out['error']} (nothing was changed)")
    return str(out["path"]), str(out["work"])


def files_into(config: BootstrapConfig, folder: str, verb: str = "mv") -> str:
    """Root's shell: ``folder`` (quoted, or a shell variable in quotes) made, the server's user's
    alone, and the database's files (with its WAL) moved into it (``verb``: ``cp -a`` copies)."""
    db = shlex.quote(database_path(config))
    user = shlex.quote(config.prefect.user)
    return (
        f"mkdir -m 0700 {folder} && chown {user}:{user} {folder} && "
        f'for f in {db} {db}-wal {db}-shm; do [ ! -e "$f" ] || {verb} "$f" {folder}/; done'
    )


def swap_database(vm: VM, config: BootstrapConfig, unpacked: str, when: str) -> str:
    """With the server stopped: the current database (and its WAL) moved into a folder of its
    own beside it, the unpacked copy moved in its place. Returns that folder."""
    db = shlex.quote(database_path(config))
    kept = f"{config.prefect.home}/before-restore-{when}"
    user = shlex.quote(config.prefect.user)
    vm.run(
        f"set -e; {files_into(config, shlex.quote(kept))}; "
        f"chown {user}:{user} {shlex.quote(unpacked)}; mv {shlex.quote(unpacked)} {db}",
        sudo=True,
        timeout=300,
    )
    return kept


def put_back(vm: VM, config: BootstrapConfig, kept: str) -> str:
    """The database the server ran with before, back in its place; the copy moved aside into
    a failed-restore folder, whose path is returned."""
    home = shlex.quote(config.prefect.home)
    q = shlex.quote(kept)
    failed = '"$failed"'  # (the folder's name, made on the VM)
    r = vm.run(
        f"set -e; systemctl stop {SERVER_UNIT}; failed={home}/failed-restore-$(date +%s); "
        f"{files_into(config, failed)}; "
        f'for f in {q}/prefect.db*; do [ ! -e "$f" ] || mv "$f" {home}/; done; '
        f'rmdir {q}; systemctl start {SERVER_UNIT}; echo "$failed"',
        sudo=True,
        timeout=120,
    )
    return r.stdout.strip()


def start_on_copy(vm: VM, config: BootstrapConfig, base: str, undo: Callable[[], str]) -> None:
    """Start the server on the restored copy; if it does not become healthy, ``undo`` gives it
    its own database back (and says where the copy went), and the error says so."""
    vm.run(f"systemctl start {SERVER_UNIT}", sudo=True, timeout=120)
    url = f"http://127.0.0.1:{config.prefect.port}/api on the VM"
    try:
        wait_for_health(f"{base}/api", timeout=300, shown=url)
    except BootstrapError as exc:
        failed = undo()
        wait_for_health(f"{base}/api", timeout=300, shown=url)
        raise BootstrapError(
            f"the server did not start on the restored copy ({exc}); it runs on its own "
            f"database again, and the copy is kept at {failed} on the VM"
        ) from None
