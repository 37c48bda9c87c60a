"""Backups of the Prefect database: the scripts the VM runs (the copy of a live WAL database,
where it lands, the unpacking of a copy to restore), the checks a copy on this machine passes
before it is restored, the pruning of old copies and the age the health check reports."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.config import BootstrapConfig
from core.errors import BootstrapError
from tasks.backup import BackupRecord, prune, sha256_of
from tasks.backup_scripts import COPY_END, COPY_SQLITE, COPY_START, copy_stem
from tasks.backup_store import age_hours, read_backup
from tasks.restore import UNPACK
from tasks.server_runs import Uses, on_postgresql


def live_database(path: Path, runs: int) -> sqlite3.Connection:
    """A database as the server keeps it: WAL, the last commits not yet checkpointed, and the
    server's connection still open."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE alembic_version (version_num TEXT)")
    db.execute("INSERT INTO alembic_version VALUES ('3c841a1800a1')")
    db.execute("CREATE TABLE flow_run (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE work_pool (id INTEGER PRIMARY KEY)")
    db.executemany("INSERT INTO flow_run (name) VALUES (?)", [(f"run-{i}",) for i in range(runs)])
    db.commit()
    return db


def run_script(script: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-", *args], input=script, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    value: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return value


def snapshot(database: Path, name: str, dest: str = "", keep: int = 14) -> dict[str, Any]:
    static = {"environment": name.rsplit("-", 1)[0], "created": name[-16:], "key_id": "k" * 16}
    script = COPY_START + COPY_SQLITE + COPY_END
    home = str(database.parent)
    return run_script(script, home, name, dest, str(keep), json.dumps(static), str(database))


def test_the_copy_holds_what_the_live_server_committed(tmp_path: Path) -> None:
    server = live_database(tmp_path / "prefect.db", runs=5)
    stale, fresh = tmp_path / ".sails-backup-killed", tmp_path / ".sails-restore-running"
    for folder in (stale, fresh):
        folder.mkdir()
    os.utime(stale, (0, 0))  # left by a run killed long ago
    assert (tmp_path / "prefect.db-wal").stat().st_size > 0  # the rows are in the WAL only
    made = snapshot(tmp_path / "prefect.db", "alma-20261204T070000Z")
    server.close()
    assert made["counts"] == {"flow_run": 5, "work_pool": 0}
    assert made["revision"] == "3c841a1800a1"
    copy = Path(made["file"])
    assert copy.name == "alma-20261204T070000Z.db.gz"
    assert copy.parent == Path(made["work"]) and copy.parent.parent == tmp_path
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
    assert sha256_of(copy, packed=True) == made["sha256"]
    assert not stale.exists() and fresh.exists()
    assert snapshot(tmp_path / "none.db", "alma-20261204T070000Z") == {
        "missing": str(tmp_path / "none.db")
    }


def test_copies_land_whole_with_their_record_and_old_ones_go(tmp_path: Path) -> None:
    """As on /arc: the VM writes the copy and its record, reads the copy back, keeps `keep`."""
    live_database(tmp_path / "prefect.db", runs=2).close()
    dest = tmp_path / "arc" / "backups" / "alma"
    stamps = [f"2026120{d}T023000Z" for d in range(1, 5)]
    for s in stamps:
        made = snapshot(tmp_path / "prefect.db", f"alma-{s}", str(dest), keep=2)
    assert made["pruned"] == ["alma-20261202T023000Z.db.gz"]  # the first went on the third
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"alma-{s}{ext}" for s in stamps[2:] for ext in (".db.gz", ".json")
    )
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {0o600}
    record = BackupRecord.model_validate_json((dest / f"alma-{stamps[-1]}.json").read_text())
    assert record.file == str(dest / f"alma-{stamps[-1]}.db.gz")
    assert record.counts == {"flow_run": 2, "work_pool": 0} and record.key_id == "k" * 16
    assert not list(tmp_path.glob(".sails-backup-*"))  # the VM's work folders are gone


def test_a_copy_is_unpacked_on_the_vm_only_when_it_checks_out(tmp_path: Path) -> None:
    live_database(tmp_path / "prefect.db", runs=3).close()
    made = snapshot(tmp_path / "prefect.db", "alma-20261204T070000Z")
    home = tmp_path / "home"
    home.mkdir()
    out = run_script(UNPACK, made["file"], made["sha256"], str(home))
    with sqlite3.connect(out["path"]) as db:
        assert db.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 3
    assert stat.S_IMODE(Path(out["path"]).stat().st_mode) == 0o600
    wrong = run_script(UNPACK, made["file"], "0" * 64, str(home))
    assert "does not match the digest" in wrong["error"]
    truncated = tmp_path / "truncated.db.gz"
    truncated.write_bytes(Path(made["file"]).read_bytes()[:200])
    assert "cannot be unpacked" in run_script(UNPACK, str(truncated), "0", str(home))["error"]
    assert "no backup at" in run_script(UNPACK, str(tmp_path / "x"), "0", str(home))["error"]
    assert len(list(home.iterdir())) == 1  # only the good one's folder is left


def keep_here(tmp_path: Path, environment: str, runs: int, when: str) -> Path:
    """A copy and its record in the local backup folder, as `backup` leaves them there."""
    source = tmp_path / f"{environment}-{when}.db"
    live_database(source, runs).close()
    folder = tmp_path / "backups" / environment
    made = snapshot(source, f"{environment}-{when}", str(folder))
    return Path(made["file"])


def test_a_copy_here_is_checked_before_it_is_restored(tmp_path: Path) -> None:
    cfg = BootstrapConfig.model_validate(
        {"environment": "alma", "backup": {"local_dir": str(tmp_path / "backups")}}
    )
    good = keep_here(tmp_path, "alma", 3, "20261204T070000Z")
    assert read_backup(good, cfg).counts["flow_run"] == 3

    other = keep_here(tmp_path, "other", 1, "20261204T070000Z")
    with pytest.raises(BootstrapError, match="backup of environment 'other', not 'alma'"):
        read_backup(other, cfg)

    damaged = keep_here(tmp_path, "alma", 3, "20261204T080000Z")
    with gzip.open(damaged, "wb") as f:
        f.write(b"SQLite format 3\0" + b"\0" * 4096)
    with pytest.raises(BootstrapError, match="does not match the digest in its record"):
        read_backup(damaged, cfg)
    damaged.write_bytes(good.read_bytes()[:300])
    with pytest.raises(BootstrapError, match="cannot be unpacked"):
        read_backup(damaged, cfg)

    damaged.with_name("alma-20261204T080000Z.json").unlink()
    with pytest.raises(BootstrapError, match=r"with its \.json record beside it"):
        read_backup(damaged, cfg)


def test_old_copies_here_are_pruned_per_environment(tmp_path: Path) -> None:
    stamps = [f"2026120{d}T000000Z" for d in range(1, 6)]
    for s in stamps:
        keep_here(tmp_path, "alma", 1, s)
    keep_here(tmp_path, "alma-test", 1, stamps[0])
    folder = tmp_path / "backups" / "alma"
    assert prune(folder, "alma", keep=2) == [f"alma-{s}.db.gz" for s in stamps[:3]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"alma-{s}{ext}" for s in stamps[3:] for ext in (".db.gz", ".json")
    )
    assert prune(folder, "alma", keep=2) == []
    assert len(list((tmp_path / "backups" / "alma-test").iterdir())) == 2


def test_the_age_of_the_newest_copy() -> None:
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    names = ["alma-20261203T023000Z.db.gz", "alma-20261204T023000Z.db.gz", "alma-x.db.gz"]
    assert age_hours(names, "alma", now) == pytest.approx(9.5)
    assert age_hours([], "alma", now) is None
    assert age_hours(["alma-latest.db.gz"], "alma", now) is None


def test_the_copies_on_arc_are_listed_by_name(tmp_path: Path) -> None:
    import getpass

    from tasks.backup import arc_folder
    from tasks.backup_store import arc_copies
    from tasks.vm import LocalHost

    cfg = BootstrapConfig.model_validate(
        {"environment": "alma", "arc": {"mount_point": str(tmp_path / "arc")}}
    )
    # run as the service user, as the VM's backup deployment is (whoever runs the tests)
    me = cfg.prefect.model_copy(update={"user": getpass.getuser()})
    cfg = cfg.model_copy(update={"prefect": me})
    folder = Path(arc_folder(cfg))
    assert folder == tmp_path / "arc/projects/ALMA-SAILS/backups/sails-bootstrap/alma"
    assert arc_copies(LocalHost(), cfg) == []  # no folder yet: no copies
    folder.mkdir(parents=True)
    for name in ("alma-20261204T023000Z", "alma-20261203T023000Z", "alma-test-20261204T0"):
        (folder / f"{name}.db.gz").touch()
        (folder / f"{name}.json").touch()
    assert arc_copies(LocalHost(), cfg, deadline=5) == [
        "alma-20261203T023000Z.db.gz",
        "alma-20261204T023000Z.db.gz",
        "alma-test-20261204T0.db.gz",  # the health check's age skips a name without a stamp
    ]


def test_the_key_id_file_names_the_key_as_the_environment_file_does(tmp_path: Path) -> None:
    """The service user reads the key's digest from its own file; servers configured before it
    existed are read from the root-only environment file: both name a key alike."""
    import subprocess

    from cryptography.fernet import Fernet

    from tasks.backup import KEY_ID
    from tasks.prefect_server import SERVER_ENV, key_digest

    key = Fernet.generate_key().decode()
    env = tmp_path / "server.env"
    env.write_text(f"PREFECT_HOME=/x\nPREFECT_SERVER_ENCRYPTION_KEY={key}\nDO_NOT_TRACK=1\n")
    shell = KEY_ID.replace(SERVER_ENV, str(env))
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout
    assert out.strip() == key_digest(key) and len(key_digest(key)) == 16


def test_the_newest_copys_age_is_judged_against_the_bound(tmp_path: Path) -> None:
    """What the health check's row and the plan's note say about the copies kept here."""
    from tasks.backup_store import freshness
    from tasks.vm import LocalHost

    cfg = BootstrapConfig.model_validate(
        {
            "environment": "alma",
            "backup": {"destination": "local", "local_dir": str(tmp_path), "max_age_hours": 48},
        }
    )
    host = LocalHost()
    status, detail = freshness(host, cfg, on_vm=False)
    assert status == "warn" and detail.startswith(f"no backup in {tmp_path / 'alma'} yet"), detail
    folder = tmp_path / "alma"
    folder.mkdir()
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(hours=72)
    (folder / f"alma-{old:%Y%m%dT%H%M%SZ}.db.gz").touch()
    assert freshness(host, cfg, on_vm=False)[0] == "fail"
    (folder / f"alma-{now - dt.timedelta(hours=2):%Y%m%dT%H%M%SZ}.db.gz").touch()
    status, detail = freshness(host, cfg, on_vm=False)
    assert status == "ok" and detail.startswith("newest 2.0 h old") and "(2 kept)" in detail
    assert freshness(host, cfg, on_vm=True)[0] == "ok"  # the VM cannot see them: not its to judge


@pytest.mark.parametrize(
    ("uses", "kind", "copied"),
    [
        # what the VM's server runs on decides, whatever the config says
        ("sqlite", "sqlite", "sqlite"),
        ("none", "sqlite", "sqlite"),  # never configured: nothing to copy, said elsewhere
        ("postgresql", "postgresql", "postgresql"),
        # a switch cut off before the server's restart: still SQLite, its file copied
        ("sqlite", "postgresql", "sqlite"),
        # kind edited back to sqlite while the server runs on PostgreSQL: its database copied
        ("postgresql", "sqlite", "postgresql"),
        # the reader could not see (the service user, its server stopped): the config speaks
        ("unknown", "postgresql", "postgresql"),
        ("unknown", "sqlite", "sqlite"),
    ],
)
def test_the_copy_is_of_the_database_the_server_runs_on(uses: Uses, kind: str, copied: str) -> None:
    """A switch leaves the SQLite file behind, which is no longer the history: the copy (and
    the restore, which takes only a copy of that database) follows what the VM runs."""
    assert ("postgresql" if on_postgresql(uses, kind) else "sqlite") == copied


def test_copies_of_either_database_are_named_pruned_and_aged_together(tmp_path: Path) -> None:
    """After a switch the copies of both databases sit side by side: one count, one age."""
    folder = tmp_path / "alma"
    folder.mkdir()
    names = [
        "alma-20261201T023000Z.db.gz",
        "alma-20261202T023000Z.pgdump",
        "alma-20261203T023000Z.pgdump",
    ]
    for name in names:
        (folder / name).touch()
        (folder / f"{copy_stem(name)}.json").touch()
    (folder / "alma-20261204T023000Z.pgdump.partial").touch()  # a copy still landing
    assert [copy_stem(n) for n in names] == [n.split(".")[0] for n in names]
    assert copy_stem("alma-20261204T023000Z.pgdump.partial") is None
    assert prune(folder, "alma", keep=2) == ["alma-20261201T023000Z.db.gz"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            *names[1:],
            *(f"{copy_stem(n)}.json" for n in names[1:]),
            "alma-20261204T023000Z.pgdump.partial",
        ]
    )
    now = dt.datetime(2026, 12, 3, 4, 30, tzinfo=dt.UTC)
    assert age_hours(names, "alma", now) == 2.0
