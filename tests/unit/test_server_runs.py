"""What the VM's Prefect server runs with: its restart decided from what runs (the process's
start against its files' times), and its database read from its process's environment, never
printing the URL's password. The reading command runs here on files like the VM's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.config import BootstrapConfig
from tasks.server_runs import (
    SERVER_ENV,
    ServerRuns,
    parse_runs,
    restart_reason,
    runs_script,
    stale_files,
    started_script,
    written_since,
)

STARTED = 1_800_000_000.0  # the process's start, in whole seconds as systemd shows it
BEFORE, SAME_SECOND, AFTER = STARTED - 3600, STARTED + 0.6, STARTED + 5.2


@pytest.mark.parametrize(
    ("mtime", "since"),
    [
        (BEFORE, False),  # written, then the server started: read
        (SAME_SECOND, False),  # written and started in one second: taken as read
        (STARTED + 1, True),
        (AFTER, True),  # written after the start: not read (a run cut off before its restart)
    ],
)
def test_a_file_counts_as_read_when_written_before_the_process_started(
    mtime: float, since: bool
) -> None:
    assert written_since(mtime, STARTED) is since


@pytest.mark.parametrize(
    ("runs", "stale"),
    [
        (ServerRuns(running=True, started=STARTED, written={"environment": BEFORE}), []),
        (
            ServerRuns(
                running=True,
                started=STARTED,
                written={"environment": AFTER, "unit": BEFORE, "venv": AFTER},
            ),
            ["environment", "venv"],
        ),
        # stopped: it reads them all when it starts
        (ServerRuns(running=False, started=None, written={"environment": AFTER}), []),
        # a start time systemd did not give: nothing is claimed stale
        (ServerRuns(running=True, started=None, written={"environment": AFTER}), []),
    ],
)
def test_what_the_running_server_has_not_read(runs: ServerRuns, stale: list[str]) -> None:
    assert stale_files(runs) == stale


@pytest.mark.parametrize(
    ("active", "changed", "stale", "database", "why"),
    [
        # as it should be: no restart
        (True, [], [], False, None),
        # stopped: started, whatever else
        (False, [], [], False, "started"),
        (False, ["environment"], ["environment"], True, "started"),
        # this run wrote what it reads
        (True, ["environment"], [], False, "restarted"),
        (True, ["unit", "environment"], [], False, "restarted"),
        (True, ["venv"], [], False, "restarted for the new venv"),
        # an earlier run wrote it and was cut off before the restart: this one restarts it
        (True, [], ["environment"], False, "older environment than the VM's"),
        (True, [], ["environment", "venv"], False, "older environment and venv"),
        # its PostgreSQL restarts under it: stopped first, in the drain
        (True, [], [], True, "restarted with its PostgreSQL"),
    ],
)
def test_the_servers_restart_is_decided_from_what_runs(
    active: bool, changed: list[str], stale: list[str], database: bool, why: str | None
) -> None:
    got = restart_reason(active, changed, stale, database)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got, got


PASSWORD = "s3cr%40t%2Fpw"
URL = f"postgresql+asyncpg://prefect:{PASSWORD}@127.0.0.1:5433/prefect_db"


@pytest.mark.parametrize("separator", ["\n", "\0"], ids=["environment file", "/proc/PID/environ"])
def test_the_database_is_read_without_its_password(tmp_path: Path, separator: str) -> None:
    """The reading command on a server environment as the file and as the process hold it
    (where the process is not running, the file speaks)."""
    env = tmp_path / "server.env"
    script = runs_script(BootstrapConfig()).replace(SERVER_ENV, str(env))

    def read() -> tuple[ServerRuns, str]:
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
        return parse_runs(out), out

    runs, _ = read()
    assert runs.uses == "none" and not runs.written
    lines = ["PREFECT_HOME=/x", f"PREFECT_SERVER_DATABASE_CONNECTION_URL={URL}", "DO_NOT_TRACK=1"]
    env.write_text(separator.join(lines) + separator)
    runs, out = read()
    assert PASSWORD not in out and "s3cr" not in out
    assert (runs.uses, runs.db_user, runs.db_port, runs.db_name) == (
        "postgresql",
        "prefect",
        5433,
        "prefect_db",
    )
    assert "environment" in runs.written
    env.write_text(separator.join(["PREFECT_HOME=/x", "DO_NOT_TRACK=1"]) + separator)
    assert read()[0].uses == "sqlite"
    env.chmod(0o000)  # (as root the file stays readable: only a user's view is checked)
    if subprocess.run(["sh", "-c", f"[ -r {env} ]"]).returncode != 0:
        assert read()[0].uses == "unknown"


def test_what_the_vm_prints_of_its_server_is_read() -> None:
    runs = parse_runs(
        "server_running=1\nstarted=1800000000\nwritten_environment=1800000005.25\n"
        "written_unit=1700000000.5\nserver=postgresql\ndb_user=prefect\ndb_port=5432\n"
        "db_name=prefect\n"
    )
    assert runs == ServerRuns(
        running=True,
        started=STARTED,
        written={"environment": 1800000005.25, "unit": 1700000000.5},
        uses="postgresql",
        db_user="prefect",
        db_port=5432,
        db_name="prefect",
    )
    assert stale_files(runs) == ["environment"]
    assert parse_runs("started=\nserver=mysql\n") == ServerRuns()


@pytest.mark.parametrize(
    ("shown", "printed"),
    [
        ("Fri 2026-12-04 21:12:19 UTC", "started=1796418739\n"),
        ("", ""),  # never started: no time (date would read '' as midnight)
        ("n/a", ""),
    ],
)
def test_the_start_systemd_shows_is_read_as_epoch_seconds(
    tmp_path: Path, shown: str, printed: str
) -> None:
    """``systemctl`` stands in here for the VM's (this machine may run no systemd)."""
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho '{shown}'\n")
    fake.chmod(0o755)
    out = subprocess.run(
        ["sh", "-c", started_script("prefect-server.service", "started")],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    ).stdout
    assert out == printed
