"""The PostgreSQL step's texts and its commands, read here: the settings, who may connect, the
unit, the server's environment, the health check's row, the role's SQL file and the password's
block. The step itself runs on real guests (tests/sandbox/test_postgres.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.config import BootstrapConfig, parse_config
from core.errors import BootstrapError
from tasks.database import scram_verifier
from tasks.postgres import (
    SETTINGS,
    hba_text,
    ident_text,
    initdb_script,
    judge_probe,
    observe_script,
    probe_script,
    settings_text,
    unit_text,
)
from tasks.postgres_role import fed_from, role_sql, stored_password
from tasks.prefect_server import server_env, server_unit

PG = parse_config({"prefect": {"database": {"kind": "postgresql"}}})
PASSWORD = "correct-horse-battery-staple"
URL = SecretStr(f"postgresql+asyncpg://prefect:{PASSWORD}@127.0.0.1:5432/prefect")
SECRET = {"auth_string": "admin:x", "encryption_key": "k"}


def test_the_server_is_pointed_at_postgresql_only_when_asked() -> None:
    lite = BootstrapConfig()
    assert "DATABASE_CONNECTION_URL" not in server_env(lite, SECRET)
    env = server_env(PG, SECRET, URL)
    assert f"PREFECT_SERVER_DATABASE_CONNECTION_URL={URL.get_secret_value()}\n" in env
    assert "sails-postgres" not in server_unit(lite)  # SQLite servers' unit stays as it was
    unit = server_unit(PG)
    assert "After=sails-postgres.service\n" in unit and "Wants=sails-postgres.service\n" in unit


def test_postgresql_listens_on_the_loopback_and_lets_in_the_servers_role_only() -> None:
    settings = settings_text(PG)
    assert "listen_addresses = 'localhost'\n" in settings and "port = 5432\n" in settings
    assert "password_encryption = 'scram-sha-256'" in settings
    rules = [line.split() for line in hba_text(PG).splitlines() if not line.startswith("#")]
    assert rules == [
        ["local", "all", "postgres", "peer"],
        # the server's own user, for copies and restores (its database and a restore's beside)
        ["local", "prefect,prefect_restoring", "prefect", "peer", "map=sails"],
        ["host", "prefect", "prefect", "127.0.0.1/32", "scram-sha-256"],
        ["host", "prefect", "prefect", "::1/128", "scram-sha-256"],
    ]
    ident = [line.split() for line in ident_text(PG).splitlines() if not line.startswith("#")]
    assert ident == [["sails", PG.prefect.user, "prefect"]]


def test_the_unit_waits_for_the_volume_and_starts_at_boot() -> None:
    unit = unit_text(PG, "16")
    assert "RequiresMountsFor=/mnt/pspace/postgres\n" in unit
    assert "ExecStart=/usr/lib/postgresql/16/bin/postgres -D /mnt/pspace/postgres\n" in unit
    assert "User=postgres\n" in unit and "Type=notify\n" in unit
    # the postmaster spared by the OOM killer, its backends not
    assert "OOMScoreAdjust=-900\n" in unit
    assert "Environment=PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj PG_OOM_ADJUST_VALUE=0\n" in unit
    assert unit.endswith("[Install]\nWantedBy=multi-user.target\n")


def test_the_role_gets_the_verifier_never_the_password() -> None:
    verifier = scram_verifier(PASSWORD, b"0123456789abcdef")
    sql = role_sql(PG, verifier, database=False)
    assert PASSWORD not in sql
    assert f"ALTER ROLE prefect WITH LOGIN PASSWORD '{verifier}';" in sql
    assert "CREATE DATABASE prefect OWNER prefect;" in sql and "pg_trgm" in sql
    kept = role_sql(PG, None, database=True)
    assert "ALTER ROLE" not in kept and "CREATE DATABASE" not in kept


def test_the_scripts_are_shell() -> None:
    for script in (observe_script(PG), initdb_script(PG, "16"), probe_script(PG)):
        r = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


def test_what_is_on_the_volume_is_read_as_it_is(tmp_path: Path) -> None:
    """The observing command, run here on folders like the volume's."""
    mount = tmp_path / "pspace"
    cfg = parse_config(
        {
            "volume": {"mount_point": str(mount)},
            "prefect": {
                "home": f"{mount}/prefect-data",
                "database": {"kind": "postgresql", "data_directory": f"{mount}/postgres"},
            },
        }
    )

    def seen() -> dict[str, str]:
        out = subprocess.run(["sh", "-c", observe_script(cfg)], capture_output=True, text=True)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    assert seen()["data"] == "missing" and "sqlite" not in seen()
    (mount / "prefect-data").mkdir(parents=True)
    (mount / "prefect-data" / "prefect.db").write_bytes(b"SQLite format 3\0")
    (mount / "postgres").mkdir()
    assert seen()["data"] == "empty" and seen()["sqlite"] == "1"
    (mount / "postgres" / "stray").write_text("x")
    assert seen()["data"] == "other"
    (mount / "postgres" / "PG_VERSION").write_text("16\n")
    (mount / "postgres" / "postgresql.conf").write_text(f"x = 1\ninclude = '{SETTINGS}'\n")
    got = seen()
    assert (got["data"], got["version"], got["included"]) == ("cluster", "16", "1")


@pytest.mark.parametrize(
    ("output", "status", "words"),
    [
        (
            "running=1\nready=1\nlisten=127.0.0.1:5432\nlisten=[::1]:5432\nmount=/mnt/pspace\n",
            "ok",
            "loopback only",
        ),
        ("ready=1\nmount=/mnt/pspace\n", "fail", "sails-postgres.service is not running"),
        ("running=1\nmount=/mnt/pspace\n", "fail", "does not accept connections"),
        ("running=1\nready=1\nlisten=0.0.0.0:5432\nmount=/mnt/pspace\n", "fail", "0.0.0.0"),
        ("running=1\nready=1\nlisten=*:5432\nmount=/mnt/pspace\n", "fail", "also listens on *"),
        ("running=1\nready=1\nlisten=127.0.0.1:5432\nmount=/\n", "fail", "not on the volume"),
    ],
)
def test_the_health_checks_database_row(output: str, status: str, words: str) -> None:
    got, detail = judge_probe(output, PG)
    assert got == status and words in detail, detail


def test_the_role_file_goes_whatever_ends_its_shell(tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "data").write_text("SELECT 1;\n")
    r = subprocess.run(
        ["sh", "-c", fed_from("{ cat; exit 3; }", str(folder / "data"))],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout) == (3, "SELECT 1;\n")  # psql's exit code kept
    assert not folder.exists()


@pytest.mark.parametrize(
    ("stored", "words"),
    [
        ({"password": "x"}, "holds a value of type dict"),
        (12345, "holds a value of type int"),
        ("", "holds an empty string"),
    ],
)
def test_a_password_block_holding_something_else_is_refused(stored: object, words: str) -> None:
    assert stored_password("db", "pw").get_secret_value() == "pw"
    with pytest.raises(BootstrapError, match=f"Secret block 'db' .*{words}"):
        stored_password("db", stored)
