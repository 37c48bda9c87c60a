"""A Prefect upgrade on a real guest: an environment set up on Prefect 3.6 (the operators'
version) with flow runs recorded is upgraded to the pinned version by changing the config,
history kept; a migration that fails leaves the old version running on its data, on SQLite and
on PostgreSQL."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import httpx
import prefect
import pytest

from core.errors import BootstrapError
from flows.configure import configure
from flows.operate import health_check
from flows.plan import plan
from flows.provision import provision
from tasks.backup import arc_folder
from tasks.prefect_server import server_secrets
from tasks.service_user import as_service_user
from tests.fixtures.bootstrap import operator_tunnel, ssh_alias

pytestmark = [pytest.mark.sandbox]

#: The operators' version (in the sandbox's package index beside the pinned one).
OLD = "3.6.29"
NEW = prefect.__version__
#: The operators' requirements on 3.6: Prefect 3.6.29 installed today resolves a FastAPI and a
#: Starlette it cannot run with; these are of its time. The upgrade drops them.
REQUIREMENTS = "fastapi<0.137\nstarlette<1\n"
#: A table left by a batch migration cut off: the next migration of block_document_reference
#: (in 3.9) cannot make its own, and fails.
BLOCKER = "_alembic_tmp_block_document_reference"


def run(cfg: Any, command: str, timeout: float = 120) -> str:
    r = ssh_alias(cfg, command, "ConnectTimeout=5", timeout=timeout)
    assert r.returncode == 0, (command, r.stderr)
    return r.stdout.strip()


def on_version(cfg: Any, version: str | None, requirements: Path | None = None) -> Any:
    update = {"version": version, "requirements": str(requirements) if requirements else None}
    return cfg.model_copy(update={"prefect": cfg.prefect.model_copy(update=update)})


def server(cfg: Any) -> tuple[str, list[str]]:
    """The version the VM's server reports and the names of its flow runs, over plain HTTP (no
    client of one version or the other in between)."""
    auth = tuple(server_secrets(cfg)["auth_string"].split(":", 1))
    with operator_tunnel(cfg) as url:
        version = httpx.get(f"{url}/admin/version", auth=auth, timeout=10).json()
        runs = httpx.post(f"{url}/flow_runs/filter", json={}, auth=auth, timeout=10).json()
    return version, sorted(r["name"] for r in runs)


def record_history(cfg: Any, name: str) -> None:
    auth = tuple(server_secrets(cfg)["auth_string"].split(":", 1))
    with operator_tunnel(cfg) as url:
        made = httpx.post(f"{url}/flows/", json={"name": "history"}, auth=auth, timeout=10)
        made.raise_for_status()
        state = {"type": "COMPLETED", "name": "Completed"}
        body = {"flow_id": made.json()["id"], "name": name, "state": state}
        httpx.post(f"{url}/flow_runs/", json=body, auth=auth, timeout=10).raise_for_status()


def arc_copies(cfg: Any) -> list[str]:
    """The environment's copies on /arc, as the service user (whose mount it is) sees them."""
    listed = run(cfg, as_service_user(cfg, f"ls {arc_folder(cfg)} 2>/dev/null || true"))
    return [name for name in listed.split() if name.endswith(".db.gz")]


def sqlite(cfg: Any, statement: str) -> None:
    """``statement`` on the server's database, as the server's user (its files stay its own)."""
    code = f"import sqlite3; c = sqlite3.connect({cfg.prefect.home + '/prefect.db'!r}); "
    code += f"c.execute({statement!r}); c.commit()"
    run(cfg, f"sudo -u {cfg.prefect.user} python3 -c {shlex.quote(code)}")


@pytest.mark.timeout(2400)
def test_prefect_3_6_upgraded_by_the_config_and_a_failed_migration_goes_back(
    vm_config, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    assert NEW != OLD
    cfg = vm_config("t-up")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(REQUIREMENTS)
    old = on_version(cfg, OLD, requirements)
    provision(old)
    configure(old)
    record_history(old, "on-3-6")
    assert server(old) == (OLD, ["on-3-6"])
    venv = cfg.prefect.venv
    earlier = set(arc_copies(old))  # (/arc outlives environments: an earlier run's copies)

    # The plan names the upgrade before anything changes.
    new = on_version(cfg, None)  # the pinned version, this package's own; no pins of 3.6's
    rows = {r.name: r for r in plan(new).vm}
    assert rows["prefect version"].changed, rows
    assert f"{OLD} → {NEW}" in rows["prefect version"].reason, rows["prefect version"]
    assert "prefect venv" not in rows  # the upgrade builds it: not named twice

    # A migration that fails: the old version runs again on its database as it was.
    sqlite(old, f"CREATE TABLE {BLOCKER} (id INTEGER)")
    with pytest.raises(BootstrapError, match=rf"Prefect {OLD} runs again") as failed:
        configure(new)
    assert "the migration failed" in str(failed.value), failed.value
    assert f"table {BLOCKER} already exists" in str(failed.value), failed.value
    assert server(old) == (OLD, ["on-3-6"])
    assert run(old, f"readlink {venv} || echo directory") == "directory"
    assert run(old, f"{venv}/bin/python -c 'import prefect; print(prefect.__version__)'") == OLD
    kept = run(old, f"sudo ls {cfg.prefect.home}").split()
    assert any(k.startswith("failed-upgrade-") for k in kept), kept
    assert run(old, "systemctl is-active prefect-server.service") == "active"

    # Mended, the same change upgrades it: history kept, the old venv kept beside.
    sqlite(old, f"DROP TABLE {BLOCKER}")
    done = {r.name: r for r in configure(new).records}
    assert f"upgraded to Prefect {OLD} → {NEW}" in done["prefect version"].reason, done
    assert server(new) == (NEW, ["on-3-6"])
    assert run(new, f"readlink {venv}") == f"{venv}-{NEW}"
    assert run(new, f"test -x {venv}.previous/bin/python && echo kept") == "kept"
    made = sorted(set(arc_copies(new)) - earlier)
    assert len(made) == 2, made  # the backups made first, one per attempt

    # A second run changes nothing.
    assert [r.name for r in configure(new).records if r.changed] == []

    # The operators' requirements changed: the same way, a venv beside. One that does not
    # install (3.9 needs Starlette 1) stops before anything is switched.
    stuck = tmp_path / "stuck.txt"
    stuck.write_text("starlette<1\n")
    with pytest.raises(BootstrapError, match="stopped before anything was switched"):
        configure(on_version(cfg, None, stuck))
    assert run(new, f"readlink {venv}") == f"{venv}-{NEW}"
    assert run(new, f"ls -d {venv}-{NEW}-* 2>/dev/null || echo none") == "none"
    # (fabric: no dependency of Prefect's or canfar's, so only the new requirements bring it)
    importable = f"{venv}/bin/python -c 'import fabric' 2>/dev/null && echo yes || echo no"
    assert run(new, importable) == "no"
    more = tmp_path / "more.txt"
    more.write_text("fabric==3.2.3\n")
    done = {r.name: r for r in configure(on_version(cfg, None, more)).records}
    assert "with the operators' new requirements" in done["prefect version"].reason, done
    assert run(new, f"readlink {venv}").startswith(f"{venv}-{NEW}-")
    assert run(new, importable) == "yes"
    assert server(new) == (NEW, ["on-3-6"])
    assert [r.name for r in configure(on_version(cfg, None, more)).records if r.changed] == []
    # An older version is refused, naming the one to set.
    with pytest.raises(BootstrapError, match=rf"set prefect\.version: {NEW}"):
        configure(old)
    assert server(new) == (NEW, ["on-3-6"])
    report = health_check(new)  # (raises on a critical probe that fails)
    assert (
        report.healthy
        and {r["probe"]: r["status"] for r in report.results}["prefect-server"] == "ok"
    ), report.results


#: A table 3.9's migrations create (after others that commit on their own, CREATE INDEX
#: CONCURRENTLY): there already, the migration fails half-way.
HELD = "automation_held_event"


def psql(cfg: Any, sql: str) -> str:
    db = cfg.prefect.database
    q = shlex.quote(sql)
    return run(cfg, f"cd / && sudo -u postgres psql -XAt -p {db.port} -d {db.name} -c {q}")


@pytest.mark.timeout(1800)
def test_on_postgresql_a_failed_migration_leaves_the_database_as_it_was(
    vm_config, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config("t-up-pg")
    pg = cfg.prefect.database.model_copy(update={"kind": "postgresql"})
    cfg = cfg.model_copy(update={"prefect": cfg.prefect.model_copy(update={"database": pg})})
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(REQUIREMENTS)
    old, new = on_version(cfg, OLD, requirements), on_version(cfg, None)
    provision(old)
    configure(old)
    record_history(old, "on-3-6")
    databases = "SELECT datname FROM pg_database WHERE datname LIKE 'prefect%' ORDER BY 1"

    # (the role's, as the server's own tables are: its copies read every table)
    role = cfg.prefect.database.user
    psql(old, f"CREATE TABLE {HELD} (id integer); ALTER TABLE {HELD} OWNER TO {role}")
    with pytest.raises(BootstrapError, match=rf"Prefect {OLD} runs again") as failed:
        configure(new)
    assert f'relation "{HELD}" already exists' in str(failed.value), failed.value
    assert server(old) == (OLD, ["on-3-6"])
    names = psql(old, databases).split()
    # the copy kept before the migration is the server's database again; the migrated one aside
    assert names[0] == "prefect" and len(names) == 2, names
    assert names[1].startswith("prefect_failed_upgrade_"), names

    psql(old, f"DROP TABLE {HELD}")
    done = {r.name: r for r in configure(new).records}
    assert f"upgraded to Prefect {OLD} → {NEW}" in done["prefect version"].reason, done
    assert server(new) == (NEW, ["on-3-6"])
    names = psql(new, databases).split()
    assert any(n.startswith("prefect_before_upgrade_") for n in names), names
    assert [r.name for r in configure(new).records if r.changed] == []
