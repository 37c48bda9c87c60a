"""PostgreSQL for the Prefect server: the distribution's server, a cluster on the volume.

The packages step installs ``postgresql`` (postgresql-common told to make no cluster of its
own). This step makes the cluster with ``initdb`` in ``prefect.database.data_directory``, where
its settings live too (a VM made again around the volume runs it as it was), and runs it under
a unit of its own that waits for the volume's mount (``RequiresMountsFor``). It listens on the
VM's loopback only; the Prefect server logs in over TCP with a password (SCRAM), the
superuser only through the local socket as the ``postgres`` user. The role's password lives in
a Secret block (``prefect.database.password_block``) and in the server's 0600 environment file;
it reaches the VM's database only as its SCRAM verifier (tasks/postgres_role.py).

Which database the server runs on, and whether a switch may happen, is ``decide_database``'s
(tasks/database.py).
"""

from __future__ import annotations

import ipaddress
import shlex

from pydantic import SecretStr

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.poll import poll
from core.records import Action
from tasks.database import (
    POSTGRES_UNIT,
    POSTGRES_UNIT_FILE,
    RESTART_SETTINGS,
    SOCKETS,
    DbAction,
    DbObserved,
    cluster_verb,
    decide_database,
    parse_observed,
    server_version,
)
from tasks.postgres_role import converge_role
from tasks.server_runs import mtime_script, runs_script, started_script
from tasks.units import enable_unit, install_unit
from tasks.vm import MANAGED, VM, StepRecord, planned

#: This tool's settings, in the data directory, included by its postgresql.conf.
SETTINGS = "sails-bootstrap.conf"


class DatabaseRecord(StepRecord):
    database: str = "sqlite"
    decision: str = DbAction.KEEP.value
    #: The cluster must restart under a running Prefect server: done in the server step's
    #: drain, the server stopped meanwhile.
    restart_with_server: bool = False


#: What the running cluster shows of its settings, and when it last read its files.
SHOWN = " UNION ALL ".join(
    [f"SELECT 'pg_{name}=' || current_setting('{name}')" for name in RESTART_SETTINGS]
    + ["SELECT 'pg_loaded=' || extract(epoch FROM pg_conf_load_time())"]
)


def observe_script(config: BootstrapConfig) -> str:
    """One root command printing what ``parse_observed`` reads: the volume's SQLite file and
    cluster, the installed servers, the running cluster's settings (through the port and socket
    its postmaster.pid names) and what the Prefect server runs with."""
    db = config.prefect.database
    data = shlex.quote(db.data_directory)
    sqlite = shlex.quote(f"{config.prefect.home}/prefect.db")
    included = shlex.quote(f"include = '{SETTINGS}'")
    psql = (
        "(cd / && timeout 20 runuser -u postgres -- env PGCONNECT_TIMEOUT=5 "
        '"/usr/lib/postgresql/$v/bin/psql" -XAtq -h "${s:-' + SOCKETS + '}" -p "$p" '
        f"-d postgres -c {shlex.quote(SHOWN)} 2>/dev/null); "
    )
    return (
        f"d={data}; [ -s {sqlite} ] && echo sqlite=1; "
        'if [ -f "$d/PG_VERSION" ]; then echo data=cluster; echo "version=$(cat "$d/PG_VERSION")"; '
        'echo "owner=$(stat -c %U "$d")"; '
        f'grep -qxF {included} "$d/postgresql.conf" 2>/dev/null && echo included=1; '
        'elif [ -d "$d" ] && [ -n "$(ls -A "$d")" ]; then echo data=other; '
        'elif [ -d "$d" ]; then echo data=empty; else echo data=missing; fi; '
        'for b in /usr/lib/postgresql/*/bin/postgres; do [ -x "$b" ] && '
        'echo "installed=$(basename "$(dirname "$(dirname "$b")")")"; done; '
        f"if systemctl is-active --quiet {POSTGRES_UNIT}; then echo running=1; "
        + started_script(POSTGRES_UNIT, "pg_started")
        + 'p=$(sed -n 4p "$d/postmaster.pid" 2>/dev/null); '
        's=$(sed -n 5p "$d/postmaster.pid" 2>/dev/null); v=$(cat "$d/PG_VERSION" 2>/dev/null); '
        'echo "pg_pid_port=$p"; if [ -n "$p" ] && [ -n "$v" ]; then '
        + psql
        + "fi; fi; "
        + mtime_script("pg_written_settings", f"{db.data_directory}/{SETTINGS}")
        + mtime_script("pg_written_pg_hba.conf", f"{db.data_directory}/pg_hba.conf")
        + mtime_script("pg_written_pg_ident.conf", f"{db.data_directory}/pg_ident.conf")
        + mtime_script("pg_written_unit", POSTGRES_UNIT_FILE)
        + f"ss -Hltn 'sport = :{db.port}' 2>/dev/null | grep -q . && echo listening=1; "
        + runs_script(config)
    )


def settings_text(config: BootstrapConfig) -> str:
    return (
        f"{MANAGED}\n"
        "listen_addresses = 'localhost'\n"
        f"port = {config.prefect.database.port}\n"
        f"unix_socket_directories = '{SOCKETS}'\n"
        "password_encryption = 'scram-sha-256'\n"
    )


#: pg_ident.conf's map from the server's system user to its role (the socket's peer check).
IDENT_MAP = "sails"


def hba_text(config: BootstrapConfig) -> str:
    """Who may connect: the superuser through the local socket as ``postgres``; the server's
    role over the loopback with its password, and through the local socket from the server's
    own system user (copies and restores, which that user makes: ``IDENT_MAP``), to its
    database and to one a restore loads beside it; nobody else."""
    db = config.prefect.database
    both = f"{db.name},{db.name}_restoring"
    return (
        f"{MANAGED}\n"
        "# TYPE  DATABASE  USER      ADDRESS       METHOD\n"
        "local   all       postgres                peer\n"
        f"local   {both}  {db.user}  peer map={IDENT_MAP}\n"
        f"host    {db.name}  {db.user}  127.0.0.1/32  scram-sha-256\n"
        f"host    {db.name}  {db.user}  ::1/128       scram-sha-256\n"
    )


def ident_text(config: BootstrapConfig) -> str:
    """The server's system user (``prefect.user``) may log in as its role, and no one else."""
    return (
        f"{MANAGED}\n"
        "# MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n"
        f"{IDENT_MAP}  {config.prefect.user}  {config.prefect.database.user}\n"
    )


def unit_text(config: BootstrapConfig, version: str) -> str:
    data = config.prefect.database.data_directory
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=PostgreSQL of the Prefect server (its data on the volume)\n"
        "After=network.target\n"
        f"RequiresMountsFor={data}\n"
        "[Service]\n"
        "Type=notify\n"
        "User=postgres\n"
        "Group=postgres\n"
        f"ExecStart=/usr/lib/postgresql/{version}/bin/postgres -D {data}\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "KillMode=mixed\n"
        "KillSignal=SIGINT\n"
        # crash recovery takes what it takes
        "TimeoutStartSec=infinity\n"
        "TimeoutStopSec=300\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        # the postmaster is the OOM killer's last choice; its backends (one per connection of
        # the Prefect server) are not, or they would outlast the server and the flows
        "OOMScoreAdjust=-900\n"
        "Environment=PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj PG_OOM_ADJUST_VALUE=0\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def initdb_script(config: BootstrapConfig, version: str) -> str:
    """A new cluster, made beside the data directory and renamed into place: a run cut off
    half-way leaves no half cluster where the next run would take it for one. An empty
    directory in the way is removed (``rmdir``: never one with anything in it)."""
    data = config.prefect.database.data_directory
    d, tmp = shlex.quote(data), shlex.quote(f"{data}.initdb")
    initdb = f"/usr/lib/postgresql/{version}/bin/initdb"
    include = shlex.quote(f"include = '{SETTINGS}'")
    return (
        f'set -e; rm -rf {tmp}; mkdir -p "$(dirname {d})"; '
        f"install -d -o postgres -g postgres -m 0700 {tmp}; "
        f"cd / && runuser -u postgres -- {initdb} -D {tmp} --username=postgres --encoding=UTF8 "
        "--locale=C.UTF-8 --auth-local=peer --auth-host=scram-sha-256 >/dev/null; "
        f"echo {include} >> {tmp}/postgresql.conf; "
        f"if [ -d {d} ]; then rmdir {d}; fi; mv -T {tmp} {d}"
    )


def _wait_ready(vm: VM, config: BootstrapConfig, version: str) -> None:
    ready = f"/usr/lib/postgresql/{version}/bin/pg_isready -q -h {SOCKETS} -p "
    poll(
        lambda: vm.run(ready + str(config.prefect.database.port), check=False).code,
        lambda code: code == 0,
        "PostgreSQL on the VM",
        300,
        interval=1,
        state=lambda code: {1: "rejecting connections (starting)", 2: "no answer"}.get(
            code, f"pg_isready exited {code}"
        ),
        timed_out=lambda code: BootstrapError(
            f"PostgreSQL on {vm.host} did not accept connections within 300 s; see "
            f"`journalctl -u {POSTGRES_UNIT}` there"
        ),
    )


def ensure_database(
    vm: VM, config: BootstrapConfig, password: SecretStr | None, apply: bool = True
) -> DatabaseRecord:
    """The database the configuration asks for, or a refusal (``cannot-proceed``) naming the
    fix when that would lose or hide history. With PostgreSQL: its cluster on the volume,
    running, listening on the loopback, the server's role with ``password`` and its database.
    A restart of the cluster under a running Prefect server is left to the server step's
    drain (``restart_with_server``)."""
    db = config.prefect.database
    seen = parse_observed(vm.run(observe_script(config), sudo=True, check=False).stdout)
    decision = decide_database(db, seen, f"{config.prefect.home}/prefect.db")
    record = DatabaseRecord(
        name="database", database=db.kind, decision=decision.action.value, applied=apply
    )
    if decision.action == DbAction.REFUSE:
        record.action, record.reason = Action.BLOCKED, decision.reason
        return record
    if db.kind == "sqlite":
        record.reason = decision.reason
        return record
    version = server_version(seen)
    if version is None or not version.isdigit():
        if apply:
            raise BootstrapError(
                f"no PostgreSQL server is installed on {vm.host} (the packages step installs "
                "postgresql): is the image's apt source missing it?"
            )
        record.action, record.reason = Action.CHANGE, f"pending: {decision.reason}"
        return record
    changes, deferred = _converge_cluster(vm, config, seen, decision.makes_cluster, version, apply)
    running = seen.running or apply
    if running and password is not None:
        # (a restart left to the server step: the cluster is still on the port it runs on)
        port = (seen.running_port or db.port) if deferred else db.port
        changes += converge_role(vm, config, version, password, apply, port)
    record.restart_with_server = deferred
    made = decision.makes_cluster and seen.data != "cluster"
    record.action = Action.CREATE if made else Action.CHANGE if changes else Action.KEEP
    done = planned(changes, apply)
    if decision.action == DbAction.KEEP:
        record.reason = done or decision.reason
    else:
        record.reason = ("" if apply else "pending: ") + decision.reason
        record.reason += f" ({done.removeprefix('pending: ')})" if done else ""
    return record


def _converge_cluster(
    vm: VM,
    config: BootstrapConfig,
    seen: DbObserved,
    make: bool,
    version: str,
    apply: bool,
) -> tuple[list[str], bool]:
    """The cluster on the volume with this tool's settings, under its unit, running; and
    whether its restart is left to the Prefect server's drain (the server runs on it)."""
    data = config.prefect.database.data_directory
    changes: list[str] = []
    exists = seen.data == "cluster"
    if make and not exists:
        changes.append(f"initdb (PostgreSQL {version}) at {data}")
        if apply:
            vm.run(initdb_script(config, version), sudo=True, timeout=600)
            exists = True
    elif exists and seen.data_owner != "postgres":  # made on a VM whose postgres had another uid
        changes.append(f"{data} handed to this VM's postgres user")
        if apply:
            vm.run(f"chown -R postgres:postgres {shlex.quote(data)}", sudo=True, timeout=1800)
    if seen.data == "cluster" and not seen.conf_included:
        changes.append(f"postgresql.conf includes {SETTINGS}")
        if apply:
            include = shlex.quote(f"include = '{SETTINGS}'")
            vm.run(f"echo {include} >> {shlex.quote(data + '/postgresql.conf')}", sudo=True)
    wrote: list[str] = []
    if exists:  # (a cluster still to be made gets them with it)
        for name, path, text in (
            ("settings", SETTINGS, settings_text(config)),
            ("pg_hba.conf", "pg_hba.conf", hba_text(config)),
            ("pg_ident.conf", "pg_ident.conf", ident_text(config)),
        ):
            if vm.write_file(
                f"{data}/{path}", text, mode="0600", owner="postgres:postgres", apply=apply
            ):
                wrote.append(name)
        changes += wrote
    if install_unit(vm, POSTGRES_UNIT_FILE, unit_text(config, version), apply):
        changes.append(f"wrote {POSTGRES_UNIT}")
        wrote.append("unit")
    if enable_unit(vm, POSTGRES_UNIT, apply):
        changes.append("enabled")
    verb, why = cluster_verb(seen, config.prefect.database, wrote)
    deferred = verb == "restart" and seen.server_running and seen.server_uses == "postgresql"
    if deferred:
        changes.append(f"{why} in the Prefect server's drain")
    elif verb:
        changes.append(why)
        if apply:
            vm.run(f"systemctl {verb} {POSTGRES_UNIT}", sudo=True, timeout=600)
    if apply and not deferred:
        _wait_ready(vm, config, version)
    return changes, deferred


# -- the health check's probe -----------------------------------------------------------------
def probe_script(config: BootstrapConfig) -> str:
    db = config.prefect.database
    return (
        f"systemctl is-active --quiet {POSTGRES_UNIT} && echo running=1; "
        "b=$(ls -d /usr/lib/postgresql/*/bin/pg_isready 2>/dev/null | sort -V | tail -1); "
        f'[ -n "$b" ] && "$b" -q -h 127.0.0.1 -p {db.port} && echo ready=1; '
        f"ss -Hltn 'sport = :{db.port}' 2>/dev/null | awk '{{print \"listen=\" $4}}'; "
        f"findmnt -n -o TARGET -T {shlex.quote(db.data_directory)} | sed 's/^/mount=/'; true"
    )


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", "0.0.0.0" spelled otherwise
        return False


def judge_probe(output: str, config: BootstrapConfig) -> tuple[str, str]:
    """The ``database`` row of the health check from what ``probe_script`` printed."""
    db = config.prefect.database
    lines = output.splitlines()
    listen = [line[7:] for line in lines if line.startswith("listen=")]
    mount = next((line[6:] for line in lines if line.startswith("mount=")), "")
    where = f"PostgreSQL at 127.0.0.1:{db.port}"
    if "running=1" not in lines:
        return "fail", f"{POSTGRES_UNIT} is not running (`journalctl -u {POSTGRES_UNIT}`)"
    if "ready=1" not in lines:
        return "fail", f"{where} does not accept connections"
    wide = [a for a in listen if not _loopback(a)]
    if wide:
        return "fail", f"{where} also listens on {', '.join(wide)}: only the loopback is meant"
    if mount != config.volume.mount_point:
        return "fail", f"{db.data_directory} is not on the volume (it is on {mount or '?'})"
    return "ok", f"{where} (loopback only), data on {mount}"


def probe_database(host: VM, config: BootstrapConfig) -> tuple[str, str]:
    return judge_probe(host.run(probe_script(config), timeout=20, check=False).stdout, config)
