"""Where the copies are (/arc or this machine), which one a restore takes, and how old the newest
is (the health check's and the plan's judgement)."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import shlex
import shutil
import sqlite3
import tempfile
from pathlib import Path

from core.config import BootstrapConfig
from core.errors import BootstrapError
from tasks.backup import BackupRecord, arc_folder, local_copies, record_beside, sha256_of
from tasks.backup_scripts import SUFFIXES, copy_stem
from tasks.service_user import as_service_user
from tasks.vm import VM


def _check_environment(record: BackupRecord, config: BootstrapConfig, where: str) -> None:
    if record.environment != config.environment:
        raise BootstrapError(
            f"{where} is a backup of environment {record.environment!r}, not "
            f"{config.environment!r}: its blocks are encrypted with another server's key"
        )


def read_backup(path: Path, config: BootstrapConfig) -> BackupRecord:
    """A copy on this machine: its record, after checking the file against it (and SQLite's
    integrity check; pg_restore reads a PostgreSQL copy on the VM)."""
    meta = record_beside(path)
    if copy_stem(path.name) is None or not path.is_file() or not meta.is_file():
        raise BootstrapError(
            f"{path}: a backup is a {' or '.join(SUFFIXES.values())} file with its .json record "
            f"beside it (see `ls {config.backup.local_folder(config.environment)}`)"
        )
    record = BackupRecord.model_validate_json(meta.read_text())
    _check_environment(record, config, str(path))
    if not path.name.endswith(SUFFIXES[record.database]):
        raise BootstrapError(f"{path} is not the copy of {record.database} its record describes")
    if record.database == "postgresql":
        if sha256_of(path) != record.sha256:
            raise BootstrapError(f"{path} does not match the digest in its record: damaged")
        return record.model_copy(update={"file": str(path)})
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "prefect.db"
        try:
            with gzip.open(path, "rb") as packed, plain.open("wb") as out:
                shutil.copyfileobj(packed, out)
        except (OSError, EOFError) as exc:
            raise BootstrapError(f"{path} cannot be unpacked ({exc}): damaged") from None
        if sha256_of(plain) != record.sha256:
            raise BootstrapError(f"{path} does not match the digest in its record: damaged")
        with contextlib.closing(sqlite3.connect(plain)) as db:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BootstrapError(f"{path}: SQLite's integrity check failed: {check}")
    return record.model_copy(update={"file": str(path)})


#: Lists a folder on /arc without ever waiting on a stale mount: the listing runs detached and
#: is read only if it ends within the deadline (a stat on a frozen sshfs can hang past SIGKILL).
LIST_ARC = r"""
out=$(mktemp) || exit 1
list="find {folder} -maxdepth 1 -name {pattern} -printf '%f\\n'"
setsid sh -c "$list > $out 2>/dev/null; touch $out.done" </dev/null >/dev/null 2>&1 &
i=0
while [ $i -lt $(({deadline} * 10)) ]; do
  if [ -e "$out.done" ]; then cat "$out"; rm -f "$out" "$out.done"; exit 0; fi
  sleep 0.1; i=$((i + 1))
done
exit 124
"""


def arc_copies(vm: VM, config: BootstrapConfig, deadline: float = 60) -> list[str]:
    """The copies of this environment on /arc, oldest first (their names sort by age). A
    stale /arc that does not answer within ``deadline`` seconds is an error."""
    script = LIST_ARC.format(
        folder=shlex.quote(arc_folder(config)),
        pattern=shlex.quote(f"{config.environment}-*"),
        deadline=max(1, round(deadline)),
    )
    r = vm.run(
        as_service_user(config, script),
        check=False,
        timeout=deadline + 20,
    )
    if r.code == 124:
        raise BootstrapError(
            f"/arc on {vm.host} did not answer within {deadline:.0f} s (stale? "
            "`sails-bootstrap remount`)"
        )
    return sorted(line for line in r.stdout.split() if copy_stem(line) is not None)


def age_hours(names: list[str], environment: str, now: dt.datetime) -> float | None:
    """Hours since the newest of the copies ``names`` was made (None: there is none)."""
    stamps = []
    for name in names:
        made = (copy_stem(name) or "").removeprefix(f"{environment}-")
        with contextlib.suppress(ValueError):
            stamps.append(dt.datetime.strptime(made, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC))
    if not stamps:
        return None
    return (now - max(stamps)).total_seconds() / 3600


def freshness(host: VM, config: BootstrapConfig, on_vm: bool) -> tuple[str, str]:
    """('ok'|'warn'|'fail', detail): the newest copy's age against ``backup.max_age_hours``,
    for the health check and the plan. No copy yet, or a listing that did not end within the
    /arc probe's bound, is a warning."""
    b = config.backup
    if config.backup_destination == "local":
        if on_vm:
            return "ok", "copies are kept on the operator's machine (not visible here)"
        names = [
            p.name for p in local_copies(b.local_folder(config.environment), config.environment)
        ]
        where = str(b.local_folder(config.environment))
    else:
        try:
            names = arc_copies(host, config, deadline=config.arc.probe_timeout)
        except BootstrapError as exc:
            return "warn", f"age unknown: {exc}"
        where = "/arc"
    age = age_hours(names, config.environment, dt.datetime.now(dt.UTC))
    if age is None:
        when = f"scheduled {b.cron} UTC"
        return "warn", f"no backup in {where} yet (`sails-bootstrap backup`; {when})"
    status = "fail" if age > b.max_age_hours else "ok"
    return status, f"newest {age:.1f} h old in {where} ({len(names)} kept)"


def find_backup(
    vm: VM | None, config: BootstrapConfig, source: str | None
) -> tuple[BackupRecord, bool]:
    """The copy ``source`` names (a file on this machine, a name or ``latest``) and whether it
    is on this machine; read and checked as far as can be without the server."""
    if source and source != "latest" and Path(source).expanduser().is_file():
        return read_backup(Path(source).expanduser(), config), True
    on_arc = config.backup_destination == "arc"
    where = arc_folder(config) if on_arc else str(config.backup.local_folder(config.environment))
    if on_arc and vm is not None:
        names = arc_copies(vm, config)
    else:
        folder = config.backup.local_folder(config.environment)
        names = [p.name for p in local_copies(folder, config.environment)]
    if source in (None, "latest"):
        if not names:
            raise BootstrapError(
                f"no backup of {config.environment} in {where}: run `sails-bootstrap backup "
                "--config FILE`, or name a file with --from"
            )
        name = names[-1]
    else:
        found = [n for n in names if source in (n, copy_stem(n))]
        name = found[0] if found else source
        if not found:
            raise BootstrapError(
                f"no backup {source!r} in {where}; there: {', '.join(names[-5:]) or 'none'}"
            )
    if not on_arc:
        return read_backup(config.backup.local_folder(config.environment) / name, config), True
    assert vm is not None
    meta = f"{arc_folder(config)}/{copy_stem(name)}.json"
    r = vm.run(as_service_user(config, f"cat {shlex.quote(meta)}"), check=False, timeout=60)
    if not r.ok:
        raise BootstrapError(f"{name} on /arc has no readable record ({meta}): {r.stderr[-200:]}")
    record = BackupRecord.model_validate_json(r.stdout)
    _check_environment(record, config, f"{arc_folder(config)}/{name}")
    return record.model_copy(update={"file": f"{arc_folder(config)}/{name}"}), False
