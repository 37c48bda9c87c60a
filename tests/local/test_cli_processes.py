"""The console scripts as processes, and the local Prefect server the CLI starts when no API is
configured."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from sails_bootstrap.local_api import ENCRYPTION_KEY_FILE, secure_local_home
from tests.unit.test_cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


SANDBOX_COMMANDS = ["install", "up", "down", "status", "env", "blocks"]


def test_the_sandbox_is_its_own_command_and_the_products_has_no_way_into_it() -> None:
    from typer.testing import CliRunner

    from sails_bootstrap.cli import app

    assert CliRunner().invoke(app, ["sandbox", "--help"]).exit_code != 0
    helped = subprocess.run(
        ["sails-sandbox", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    for command in SANDBOX_COMMANDS:
        assert f"    {command} " in helped.stdout, helped.stdout
    missing = subprocess.run(
        ["sails-sandbox", "blocks"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert missing.returncode == 2 and "--config" in missing.stderr
    # Importing every product module brings in nothing of the sandbox.
    probe = (
        "import importlib, pkgutil, sys\n"
        "for pkg in ('core', 'blocks', 'tasks', 'flows', 'deployments', 'sails_bootstrap'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.iter_modules(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m == 'sandbox' or m.startswith('sandbox.')))\n"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().splitlines()[-1] == "[]", imported.stdout


def test_blocks_register_against_a_real_server(prefect_server) -> None:  # type: ignore[no-untyped-def]
    result = run("blocks", "register", env=prefect_server.env())
    assert result.returncode == 0, result.stderr
    assert "ssh-key-pair" in result.stdout
    listed = subprocess.run(
        ["prefect", "block", "type", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, **prefect_server.env(), "COLUMNS": "200"},
        timeout=120,
    )
    assert "openstack-credentials" in listed.stdout


def test_first_command_with_a_fresh_prefect_home(tmp_path: Path) -> None:
    """The first command that needs the API starts a local server, whose first start creates
    its database (longer than Prefect's own 20 s bound on a small machine): it shows progress
    and succeeds, with no traceback."""
    home = tmp_path / "prefect-home"
    result = subprocess.run(
        ["sails-bootstrap", "blocks", "register"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=fresh_home_env(home),
        timeout=600,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "Traceback" not in said, said
    assert "starting a local Prefect server" in result.stderr
    assert "local Prefect server ready at http://127.0.0.1:" in result.stderr
    assert "registered block type openstack-credentials" in result.stdout
    assert (home / "prefect.db").exists()  # its database, made by this first start
    # Secrets at rest: the home 0700, the database 0600, the blocks' key outside the database.
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "prefect.db").stat().st_mode) == 0o600
    key_file = home / ENCRYPTION_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as con:
        keys = [k for (k,) in con.execute("SELECT key FROM configuration")]
    assert "ENCRYPTION_KEY" not in keys, keys


def test_a_key_kept_in_the_database_is_moved_out(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A home whose database holds the blocks' key (a server Prefect started by itself): the key
    moves to the 0600 file and out of the database, unchanged, so the blocks stay readable."""
    from cryptography.fernet import Fernet

    home = tmp_path / "old-home"
    home.mkdir(mode=0o755)
    db = home / "prefect.db"
    key = Fernet.generate_key().decode()
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("CREATE TABLE configuration (key TEXT, value JSON)")
        con.execute(
            "INSERT INTO configuration VALUES ('ENCRYPTION_KEY', ?)",
            (json.dumps({"fernet_key": key}),),
        )
    db.chmod(0o644)
    monkeypatch.delenv("PREFECT_SERVER_ENCRYPTION_KEY", raising=False)
    key_file = secure_local_home(home, None)
    assert key_file.read_text() == key
    assert os.environ["PREFECT_SERVER_ENCRYPTION_KEY"] == key
    assert [stat.S_IMODE(p.stat().st_mode) for p in (home, db, key_file)] == [0o700, 0o600, 0o600]
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT count(*) FROM configuration").fetchone() == (0,)
    monkeypatch.delenv("PREFECT_SERVER_ENCRYPTION_KEY")
    assert secure_local_home(home, None).read_text() == key  # kept, never rotated


def test_local_server_that_does_not_start_in_time_names_the_fix(tmp_path: Path) -> None:
    # A bound no first start meets: one line naming the fix, no traceback.
    result = subprocess.run(
        ["sails-bootstrap", "blocks", "register"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=fresh_home_env(
            tmp_path / "prefect-home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"
        ),
        timeout=300,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert "Traceback" not in said, said
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said
    assert "did not answer within 1 s" in errors[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert "PREFECT_API_URL" in errors[0]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sails-bootstrap", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_the_console_script_is_installed() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert all(c[0] in result.stdout for c in COMMANDS if c), result.stdout


def test_validate_example_and_malformed(tmp_path: Path) -> None:
    ok = run("config", "validate", "examples/arbutus.yaml")
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("volume:\n  size_gb: -5\n")
    result = run("config", "validate", str(bad))
    assert result.returncode != 0
    assert "volume.size_gb" in result.stderr


def test_show_fills_defaults_and_names() -> None:
    result = run("config", "show", "examples/arbutus.yaml")
    assert result.returncode == 0, result.stderr
    assert "image: Ubuntu-24.04-Noble-x64-2024-06" in result.stdout
    assert "server:  alma-sails-vm" in result.stdout


def fresh_home_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: an empty Prefect home, no profile, no API URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", **extra)
    return env
