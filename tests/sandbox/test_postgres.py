"""PostgreSQL on the volume as the Prefect server's database, on a real guest: a SQLite history
is kept until the operator asks to switch, the switch leaves the SQLite file as it was, copies
are pg_dump's and put back (a damaged one refused), and the cluster comes back with the VM."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from core.errors import BootstrapError
from flows.backup import backup, restore
from flows.configure import configure
from flows.operate import health_check
from flows.plan import plan
from flows.provision import provision
from tasks.prefect_server import server_secrets
from tasks.service_user import as_service_user
from tasks.vm_server import remote_client
from tests.fixtures.bootstrap import operator_tunnel, ssh_alias

pytestmark = [pytest.mark.sandbox]


@flow(name="history")
def history() -> None:
    """A flow whose runs stand for the pipeline's history on the VM's server."""


def run(cfg: Any, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return ssh_alias(cfg, command, "ConnectTimeout=5", timeout=timeout)


def database(cfg: Any, **settings: Any) -> Any:
    """``cfg`` with prefect.database set to ``settings``."""
    db = cfg.prefect.database.model_copy(update=settings)
    return cfg.model_copy(update={"prefect": cfg.prefect.model_copy(update={"database": db})})


def flow_runs(cfg: Any) -> list[str]:
    """The names of the flow runs on the VM's server, through the operator's tunnel."""
    auth = server_secrets(cfg)["auth_string"]
    with operator_tunnel(cfg) as url, remote_client(f"{url}", auth) as client:
        return sorted(r.name for r in client.read_flow_runs())


def record_history(cfg: Any, name: str) -> None:
    auth = server_secrets(cfg)["auth_string"]
    with operator_tunnel(cfg) as url, remote_client(url, auth) as client:
        client.create_flow_run(history, name=name)


LIST_DATABASES = "cd / && sudo -u postgres psql -XAt -p 5432 -c 'SELECT datname FROM pg_database'"

SQLITE_ROWS = (
    "sudo python3 -c \"import sqlite3, sys; print(sqlite3.connect('file:' + sys.argv[1] + "
    "'?mode=ro', uri=True).execute('select count(*) from flow_run').fetchone()[0])\" {path}"
)


@pytest.mark.timeout(1800)
def test_sqlite_history_kept_until_the_switch_then_postgresql_on_the_volume(vm_config) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config("t-pg")
    provision(cfg)
    configure(cfg)  # SQLite, the default
    record_history(cfg, "before-the-switch")
    sqlite = f"{cfg.prefect.home}/prefect.db"
    digest = f"sudo sha256sum {sqlite}"

    # Asked for PostgreSQL without consent to leave the SQLite history: refused, before
    # anything changed.
    pg = database(cfg, kind="postgresql")
    with pytest.raises(BootstrapError, match=r"prefect\.database\.switch: true"):
        configure(pg)
    assert "before-the-switch" in flow_runs(cfg)
    assert run(cfg, "systemctl is-active sails-postgres.service").stdout.strip() != "active"

    # The plan names the switch; the switch runs the server on a new cluster on the volume.
    switch = database(cfg, kind="postgresql", switch=True)
    pending = {r.name: r for r in plan(switch).vm}
    assert any("switch" in r.reason for r in pending.values() if r.changed), pending
    configure(switch)
    assert flow_runs(switch) == []  # the history is not copied ...
    rows = run(switch, SQLITE_ROWS.format(path=sqlite)).stdout.strip()
    assert rows == "1", rows  # ... and the SQLite file keeps it
    kept = run(switch, digest).stdout
    record_history(switch, "on-postgresql")
    data = switch.prefect.database.data_directory
    where = run(switch, f"sudo stat -c '%U %a' {data}; findmnt -n -o TARGET -T {data}").stdout
    assert where.split() == ["postgres", "700", "/mnt/pspace"], where
    listening = run(switch, "ss -Htln 'sport = :5432'").stdout.split()
    assert "127.0.0.1:5432" in listening and "0.0.0.0:5432" not in listening, listening
    env = run(switch, "sudo cat /etc/sails-bootstrap/prefect-server.env").stdout
    assert "postgresql+asyncpg://" in env
    # the distribution's package made no cluster of its own on the root disk
    assert run(switch, "ls /etc/postgresql 2>/dev/null | wc -l").stdout.strip() == "0"

    # A second run changes nothing; the SQLite file is never written again.
    assert [r.name for r in configure(switch).records if r.changed] == []
    # A run cut off after writing the server's settings, before the restart: the next run
    # restarts the server that still runs on the older ones.
    run(switch, "sudo touch /etc/sails-bootstrap/prefect-server.env")
    server = {r.name: r for r in configure(switch).records}["prefect server"]
    assert "restarted: it ran with an older environment" in server.reason, server.reason
    assert [r.name for r in configure(switch).records if r.changed] == []
    assert run(switch, digest).stdout == kept
    # Copies are of the database the server runs on: pg_dump's archive, off the VM.
    copy = backup(switch)
    assert copy is not None and copy.database == "postgresql", copy
    assert copy.file.endswith(".pgdump") and copy.counts["flow_run"] == 1, copy
    report = health_check(switch)
    rows_by_probe = {r["probe"]: r for r in report.results}
    assert rows_by_probe["database"]["status"] == "ok", rows_by_probe["database"]
    assert rows_by_probe["backup"]["status"] == "ok", rows_by_probe["backup"]
    # Put back: what was written since is gone, the database it replaced is kept.
    record_history(switch, "after-the-copy")
    done = restore(switch)
    assert flow_runs(switch) == ["on-postgresql"]
    replaced = done.kept.removeprefix("PostgreSQL database ")
    assert replaced.startswith("prefect_before_restore_"), done.kept
    databases = run(switch, LIST_DATABASES).stdout.split()
    assert replaced in databases and "prefect_restoring" not in databases, databases
    assert health_check(switch).healthy
    # A damaged copy is refused before anything changes.
    damaged = as_service_user(switch, f"truncate -s 4000 {shlex.quote(copy.file)}")
    assert run(switch, damaged).returncode == 0
    record_history(switch, "after-the-restore")
    with pytest.raises(BootstrapError, match="does not match the digest in its record"):
        restore(switch)
    assert flow_runs(switch) == ["after-the-restore", "on-postgresql"]
    assert run(switch, LIST_DATABASES).stdout.split() == databases

    # Another port under the running server: the cluster restarts inside the server's drain
    # (server stopped, cluster restarted, server started on the new URL), history kept.
    moved = database(switch, port=5433)
    done = {r.name: r for r in configure(moved).records}
    assert (
        "restarted (port 5432 -> 5433) in the Prefect server's drain" in done["database"].reason
    ), done["database"].reason
    assert "restarted with its PostgreSQL" in done["prefect server"].reason, done
    assert flow_runs(moved) == ["after-the-restore", "on-postgresql"]
    listening = run(moved, "ss -Htln").stdout
    assert "127.0.0.1:5433" in listening and ":5432 " not in listening, listening
    assert [r.name for r in configure(moved).records if r.changed] == []

    # A reboot brings the cluster and the server back, history and all.
    ssh_config = str(Path(cfg.ssh.config_dir) / "config")
    subprocess.Popen(
        ["ssh", "-F", ssh_config, cfg.ssh.alias, "sudo systemctl reboot"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    deadline = time.monotonic() + 180
    seen: list[str] | str = "nothing yet"
    while time.monotonic() < deadline:
        try:
            seen = flow_runs(moved)
            break
        except Exception as exc:  # the VM, its sshd or its server still on the way
            seen = repr(exc)
        time.sleep(2)
    assert seen == ["after-the-restore", "on-postgresql"], seen
    assert run(moved, "systemctl is-active sails-postgres.service").stdout.strip() == "active"
    assert run(moved, digest).stdout == kept
