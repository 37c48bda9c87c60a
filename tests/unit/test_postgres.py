"""The PostgreSQL step's texts and its commands, read here: the settings, who may connect, the
unit, the server's environment, the health check's row; and the step run against a scripted VM
(what it would run for a new cluster, a refusal, a plan and a cluster as configured), where the
password must show on no command line and in no file but as its SCRAM verifier. Real guests
run it in the sandbox (not here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from core.config import BootstrapConfig, parse_config
from core.errors import BootstrapError
from core.records import Action
from tasks.database import scram_verifier
from tasks.postgres import (
    SETTINGS,
    ensure_database,
    hba_text,
    initdb_script,
    judge_probe,
    observe_script,
    probe_script,
    settings_text,
    unit_text,
)
from tasks.postgres_role import fed_from, role_sql, stored_password
from tasks.prefect_server import server_env, server_unit
from tasks.vm import VM, Result

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
        ["host", "prefect", "prefect", "127.0.0.1/32", "scram-sha-256"],
        ["host", "prefect", "prefect", "::1/128", "scram-sha-256"],
    ]


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


# -- the step against a scripted VM ------------------------------------------------------------
class ScriptedVM(VM):
    """Answers the step's reads from ``observed``, ``role`` and ``files``; records the rest."""

    def __init__(self, observed: str, role: str = "", files: dict[str, str] | None = None):
        self.host, self.port = "vm", 22
        self.observed, self.role, self.files = observed, role, files or {}
        self.commands: list[str] = []
        self.uploads: list[str] = []
        self.enabled = False

    def run(self, command: str, **_: Any) -> Result:
        self.commands.append(command)
        if command.startswith("d="):
            return Result(self.observed, "", 0)
        if "is-enabled" in command:
            return Result("", "", 0 if self.enabled else 1)
        if " -At -c " in command:
            return Result(self.role, "", 0)
        read = re.match(r"stat -c '%a %U:%G' (\S+) ", command)
        if read:
            path = read.group(1)
            if path not in self.files:
                return Result("missing\n", "", 0)
            owner = "600 postgres:postgres" if path.startswith("/mnt") else "644 root:root"
            return Result(f"{owner}\n{self.files[path]}", "", 0)
        return Result("", "", 0)

    def upload(self, data: bytes) -> str:
        self.uploads.append(data.decode())
        return f"/tmp/upload{len(self.uploads)}/data"


FRESH = "data=missing\ninstalled=16\nserver=none\n"


def writes(vm: ScriptedVM) -> list[str]:
    """The commands that change something (the one read aside)."""
    return [
        c
        for c in vm.commands
        if re.search(r"initdb|systemctl (start|restart|reload|enable)|psql", c)
        and not c.startswith("d=")
    ]


def test_a_new_cluster_is_made_and_the_password_stays_off_the_command_line() -> None:
    vm = ScriptedVM(FRESH)
    record = ensure_database(vm, PG, SecretStr(PASSWORD), apply=True)
    assert record.action == Action.CREATE, record.reason
    assert "a new PostgreSQL cluster at /mnt/pspace/postgres" in record.reason
    assert any(
        "/usr/lib/postgresql/16/bin/initdb -D /mnt/pspace/postgres.initdb" in c for c in vm.commands
    )
    assert "systemctl start sails-postgres.service" in vm.commands
    assert "systemctl enable sails-postgres.service" in vm.commands
    (sql,) = [u for u in vm.uploads if "ALTER ROLE" in u]
    assert "SCRAM-SHA-256$4096:" in sql
    assert all(PASSWORD not in c for c in vm.commands)
    assert all(PASSWORD not in u for u in vm.uploads)
    assert PASSWORD not in record.model_dump_json()


def test_a_refused_switch_changes_nothing() -> None:
    vm = ScriptedVM("sqlite=1\ndata=missing\ninstalled=16\nserver=sqlite\n")
    record = ensure_database(vm, PG, SecretStr(PASSWORD), apply=True)
    assert record.action == Action.BLOCKED
    assert "set prefect.database.switch: true" in record.reason
    assert len(vm.commands) == 1 and not vm.uploads  # the one read


def test_a_plan_names_the_switch_and_writes_nothing() -> None:
    on = parse_config({"prefect": {"database": {"kind": "postgresql", "switch": True}}})
    vm = ScriptedVM("sqlite=1\ndata=missing\ninstalled=16\nserver=sqlite\n")
    record = ensure_database(vm, on, SecretStr(PASSWORD), apply=False)
    assert record.action == Action.CREATE and not record.applied
    assert record.reason.startswith("pending: switch the Prefect server from SQLite")
    assert "initdb (PostgreSQL 16)" in record.reason
    assert not writes(vm) and not vm.uploads


def test_a_cluster_as_configured_is_kept() -> None:
    data = "/mnt/pspace/postgres"
    files = {
        f"{data}/{SETTINGS}": settings_text(PG),
        f"{data}/pg_hba.conf": hba_text(PG),
        "/etc/systemd/system/sails-postgres.service": unit_text(PG, "16"),
    }
    observed = (
        "data=cluster\nversion=16\nowner=postgres\nincluded=1\ninstalled=16\n"
        "running=1\nlistening=1\nserver=postgresql\n"
    )
    role = f"role={scram_verifier(PASSWORD, b'saltsaltsaltsalt')}\ndatabase=1\n"
    vm = ScriptedVM(observed, role, files)
    vm.enabled = True
    record = ensure_database(vm, PG, SecretStr(PASSWORD), apply=True)
    assert record.action == Action.KEEP, record.reason
    assert record.reason == "PostgreSQL 16 at /mnt/pspace/postgres"
    assert not [c for c in writes(vm) if "-At -c" not in c] and not vm.uploads
    # another password in the block: the role's is set again, through its verifier
    vm = ScriptedVM(observed, role, files)
    vm.enabled = True
    record = ensure_database(vm, PG, SecretStr("another"), apply=True)
    assert record.action == Action.CHANGE and "the role's password" in record.reason
    assert any("ALTER ROLE" in u for u in vm.uploads)


def test_a_port_moved_under_a_running_server_restarts_the_cluster_in_the_servers_drain() -> None:
    """PostgreSQL runs on 5432 and the settings say 5433, the Prefect server running on it:
    the step writes the settings and leaves the restart to the server step's drain; the role
    is read through the port the cluster still runs on."""
    moved = parse_config({"prefect": {"database": {"kind": "postgresql", "port": 5433}}})
    data = "/mnt/pspace/postgres"
    files = {
        f"{data}/{SETTINGS}": settings_text(PG),  # (5432's)
        f"{data}/pg_hba.conf": hba_text(PG),
        "/etc/systemd/system/sails-postgres.service": unit_text(PG, "16"),
    }
    observed = (
        "data=cluster\nversion=16\nowner=postgres\nincluded=1\ninstalled=16\nrunning=1\n"
        "pg_pid_port=5432\npg_port=5432\npg_listen_addresses=localhost\n"
        "pg_unix_socket_directories=/var/run/postgresql\npg_loaded=1800000100\n"
        "server_running=1\nserver=postgresql\ndb_user=prefect\ndb_port=5432\ndb_name=prefect\n"
    )
    role = f"role={scram_verifier(PASSWORD, b'saltsaltsaltsalt')}\ndatabase=1\n"
    vm = ScriptedVM(observed, role, files)
    vm.enabled = True
    record = ensure_database(vm, moved, SecretStr(PASSWORD), apply=True)
    assert record.restart_with_server, record.reason
    assert "restarted (port 5432 -> 5433) in the Prefect server's drain" in record.reason
    assert not [c for c in writes(vm) if "systemctl" in c]
    assert not [c for c in vm.commands if "pg_isready" in c]
    (read,) = [c for c in vm.commands if " -At -c " in c]
    assert " -p 5432 " in read
    # the server not on it (a switch under way): restarted here, at once
    vm = ScriptedVM(observed.replace("server=postgresql", "server=sqlite"), role, files)
    vm.enabled = True
    record = ensure_database(vm, moved, SecretStr(PASSWORD), apply=True)
    assert not record.restart_with_server
    assert "systemctl restart sails-postgres.service" in vm.commands


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
