"""What the VM runs to make a copy of the Prefect database (tasks/backup.py runs it), and
how a copy's file is named."""

from __future__ import annotations

#: Tables counted into a copy's record (what an operator looks for in it).
COUNTED = ("flow_run", "deployment", "work_pool", "block_document")

#: A copy's file name ends in what it is: SQLite's database gzipped, or pg_dump's custom format
#: (compressed by pg_dump itself).
SUFFIXES = {"sqlite": ".db.gz", "postgresql": ".pgdump"}


def copy_stem(name: str) -> str | None:
    """``name`` without a copy's suffix (None: not a copy's name)."""
    for suffix in SUFFIXES.values():
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


#: Run on the VM as the server's user: ``python3 SCRIPT HOME NAME DEST KEEP RECORD ARGS...``
#: (DEST empty: the copy stays in a private folder of HOME for this machine to fetch; RECORD: the
#: record's fields known beforehand, as JSON). A part per database makes the copy (``packed``)
#: and fills the record; the common end checks it, puts it in DEST and prunes. Prints the whole
#: record (``{"missing": …}``: no database; ``{"integrity"|"failed"|"landed": …}``: no copy).
COPY_START = rf"""
import glob, gzip, hashlib, json, os, shutil, subprocess, sys, tempfile, time
home, name, dest, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
record, args = json.loads(sys.argv[5]), sys.argv[6:]
SUFFIXES = {SUFFIXES!r}
COUNTED = {COUNTED!r}

def digest(path, packed):
    h = hashlib.sha256()
    with (gzip.open if packed else open)(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def give_up(**why):
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(why))
    sys.exit(0)

# what a run killed mid-way left (a day old: not a run going on now)
for left in glob.glob(os.path.join(home, ".sails-*-*")):
    if os.path.getmtime(left) < time.time() - 86400:
        shutil.rmtree(left, ignore_errors=True)
"""

#: SQLite's part (ARGS: the database): its online backup API, consistent while the server keeps
#: writing; SQLite's integrity check; gzipped. The digest is of the database itself.
COPY_SQLITE = r"""
import sqlite3
database = args[0]
if not os.path.isfile(database):
    print(json.dumps({"missing": database}))
    sys.exit(0)
work = tempfile.mkdtemp(prefix=".sails-backup-", dir=home)
copy = os.path.join(work, "prefect.db")
source = sqlite3.connect(database, timeout=60)
target = sqlite3.connect(copy)
source.backup(target)
source.close()
check = target.execute("PRAGMA integrity_check").fetchone()[0]
if check != "ok":
    give_up(integrity="SQLite's integrity check of the copy failed: " + check)
tables = {r[0] for r in target.execute("SELECT name FROM sqlite_master WHERE type='table'")}
record["counts"] = {t: target.execute("SELECT count(*) FROM " + t).fetchone()[0]
                    for t in COUNTED if t in tables}
if "alembic_version" in tables:
    row = target.execute("SELECT version_num FROM alembic_version").fetchone()
    record["revision"] = row[0] if row else None
target.close()
record["bytes"] = os.path.getsize(copy)
record["sha256"] = digest(copy, False)
packed = os.path.join(work, name + SUFFIXES["sqlite"])
with open(copy, "rb") as raw, gzip.open(packed, "wb", 6) as out:
    shutil.copyfileobj(raw, out, 1 << 20)
os.remove(copy)
"""

#: PostgreSQL's part (ARGS: socket folder, port, database, role): pg_dump's custom format, one
#: consistent snapshot while the server keeps writing, made as the server's role (its user
#: maps to it through the local socket); the archive's table of contents read back with
#: pg_restore -l. The digest is of the archive.
COPY_POSTGRESQL = r"""
sockets, port, database, role = args
work = tempfile.mkdtemp(prefix=".sails-backup-", dir=home)
packed = os.path.join(work, name + SUFFIXES["postgresql"])
env = dict(os.environ, PGCONNECT_TIMEOUT="10")
login = ["-h", sockets, "-p", port, "-U", role, "-d", database]
def sql(query):
    r = subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", *login, "-c", query],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        give_up(failed="psql: " + r.stderr.strip()[-400:])
    return r.stdout.split()
r = subprocess.run(["pg_dump", "-Fc", "-f", packed, *login], capture_output=True, text=True,
                   env=env)
if r.returncode:
    give_up(failed="pg_dump: " + r.stderr.strip()[-400:])
r = subprocess.run(["pg_restore", "-l", packed], capture_output=True, text=True)
if r.returncode:
    give_up(integrity="pg_restore cannot read the copy: " + r.stderr.strip()[-400:])
tables = set(sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
counted = [t for t in COUNTED if t in tables]
if counted:
    numbers = sql(" UNION ALL ".join("(SELECT count(*) FROM %s)" % t for t in counted))
    record["counts"] = dict(zip(counted, map(int, numbers)))
if "alembic_version" in tables:
    record["revision"] = (sql("SELECT version_num FROM alembic_version") or [None])[0]
record["bytes"] = os.path.getsize(packed)
record["sha256"] = digest(packed, False)
"""

#: The common end: the copy in DEST, read back there and compared, its record beside it; the
#: oldest copies of the environment (of either database) beyond KEEP removed.
COPY_END = r"""
gz = packed.endswith(".gz")
record["file"] = packed
if dest:
    os.makedirs(dest, mode=0o700, exist_ok=True)
    final = os.path.join(dest, os.path.basename(packed))
    shutil.copyfile(packed, final + ".partial")
    if digest(final + ".partial", gz) != record["sha256"]:
        os.remove(final + ".partial")
        give_up(landed="the copy read back from " + dest + " differs")
    os.chmod(final + ".partial", 0o600)
    os.replace(final + ".partial", final)
    record["file"] = final
    meta = os.path.join(dest, name + ".json")
    with open(meta + ".partial", "w") as f:
        json.dump(record, f, indent=2)
    os.chmod(meta + ".partial", 0o600)
    os.replace(meta + ".partial", meta)
    shutil.rmtree(work)
    copies = sorted(
        os.path.basename(p)
        for suffix in SUFFIXES.values()
        for p in glob.glob(os.path.join(dest, record["environment"] + "-*" + suffix))
    )
    record["pruned"] = []
    for old in copies[: max(0, len(copies) - keep)]:
        os.remove(os.path.join(dest, old))
        stem = next(old[: -len(s)] for s in SUFFIXES.values() if old.endswith(s))
        if os.path.exists(os.path.join(dest, stem + ".json")):
            os.remove(os.path.join(dest, stem + ".json"))
        record["pruned"].append(old)
else:
    record["work"] = work
print(json.dumps(record))
"""
