"""Which database the VM's Prefect server runs on, decided from what the VM shows: pure.

SQLite (``prefect.home/prefect.db``) is the default. PostgreSQL is a cluster of the VM's own
PostgreSQL, its data directory on the volume. A volume whose SQLite database holds the server's
history keeps it until the operator sets ``prefect.database.switch``; a switch never deletes or
moves the SQLite file, and copies none of its history (Prefect offers no way to). The cluster's
existence on the volume records that the switch was asked for: a run cut off after it was made,
or a VM made again around the same volume, finishes the switch without asking again.

``tasks/postgres.py`` reads the VM and applies the decision.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from enum import StrEnum
from typing import Literal, cast
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, Field

from core.prefect_settings import DatabaseSettings
from tasks.server_runs import URL_VARIABLES, key_values, number, written_since, written_times

#: This tool's unit for the cluster on the volume (not Debian's postgresql@VERSION-NAME: that one
#: keeps the cluster's settings on the root disk, which a VM made again would not have).
POSTGRES_UNIT = "sails-postgres.service"
POSTGRES_UNIT_FILE = f"/etc/systemd/system/{POSTGRES_UNIT}"
#: Where the cluster's local sockets are (postgresql-common's /run/postgresql).
SOCKETS = "/var/run/postgresql"
#: What this tool's settings file sets that takes a restart, and its value.
RESTART_SETTINGS = ("port", "listen_addresses", "unix_socket_directories")


class DbAction(StrEnum):
    KEEP = "keep"  # as configured: nothing to do but check the settings
    INIT = "init"  # a new cluster for a server with no history elsewhere
    SWITCH = "switch"  # the server moves from SQLite to the cluster (the SQLite file stays)
    ADOPT = "adopt"  # the volume's cluster, made by an earlier VM: run it, point the server at it
    START = "start"  # the server's cluster is there but stopped
    REFUSE = "refuse"  # changing anything would lose or hide history: the reason names the fix


DataState = Literal["missing", "empty", "cluster", "other"]


class DbObserved(BaseModel):
    """What the VM shows of its databases."""

    #: A non-empty prefect.db in prefect.home (a server that ran on SQLite).
    sqlite_file: bool = False
    #: The data directory: "missing", "empty", "cluster" (it holds PG_VERSION) or "other" (files,
    #: but no cluster).
    data: DataState = "missing"
    #: The cluster's PostgreSQL major version (PG_VERSION), when there is one.
    cluster_version: str | None = None
    #: The user owning the data directory.
    data_owner: str | None = None
    #: Its postgresql.conf includes this tool's settings file.
    conf_included: bool = False
    #: Major versions of the PostgreSQL server installed on the VM.
    installed: list[str] = Field(default_factory=list)
    #: This tool's PostgreSQL unit is active.
    running: bool = False
    #: Something listens on prefect.database.port.
    port_listening: bool = False
    #: What the Prefect server runs on: its running process's environment, or while it is
    #: stopped its environment file ("none": no such file yet).
    server_uses: Literal["none", "sqlite", "postgresql"] = "none"
    #: The Prefect server's process is running.
    server_running: bool = False
    #: The role, port and database its PostgreSQL URL names.
    server_db_user: str | None = None
    server_db_port: int | None = None
    server_db_name: str | None = None
    #: The running cluster's settings that take a restart (``SHOW``), by name.
    shown: dict[str, str] = Field(default_factory=dict)
    #: The port the running cluster listens on (its postmaster.pid).
    running_port: int | None = None
    #: When the running cluster last read its settings (epoch seconds).
    conf_loaded: float | None = None
    #: When the cluster's process started (epoch seconds, whole).
    cluster_started: float | None = None
    #: Modification times of the settings file, pg_hba.conf and the unit.
    written: dict[str, float] = Field(default_factory=dict)

    @property
    def port_busy(self) -> bool:
        """Another server holds the port (ours is not running)."""
        return self.port_listening and not self.running


class DbDecision(BaseModel):
    action: DbAction
    reason: str

    @property
    def makes_cluster(self) -> bool:
        return self.action in (DbAction.INIT, DbAction.SWITCH)


def _do(action: DbAction, reason: str) -> DbDecision:
    return DbDecision(action=action, reason=reason)


def _refuse(reason: str) -> DbDecision:
    return DbDecision(action=DbAction.REFUSE, reason=reason)


def decide_database(db: DatabaseSettings, seen: DbObserved, sqlite_path: str) -> DbDecision:
    """The action for the configured ``db`` given what the VM shows."""
    where = db.data_directory
    version = seen.cluster_version
    if db.kind == "sqlite":
        if seen.server_uses == "postgresql":
            return _refuse(
                f"the Prefect server runs on PostgreSQL ({where}), which holds its "
                "history; this tool does not move it back to SQLite: set "
                "prefect.database.kind: postgresql"
            )
        if seen.data == "cluster" and seen.server_uses == "none":
            return _refuse(
                f"the volume holds the PostgreSQL cluster at {where} that the Prefect "
                f"server ran on; on SQLite it would show the older history of {sqlite_path} "
                "instead: set prefect.database.kind: postgresql"
            )
        return _do(DbAction.KEEP, f"SQLite at {sqlite_path}")
    if seen.data == "other":
        return _refuse(
            f"{where} holds files but no PostgreSQL cluster (no PG_VERSION): move them "
            "away or set prefect.database.data_directory to another folder; nothing is "
            "written over them"
        )
    if version and seen.installed and version not in seen.installed:
        return _refuse(
            f"the cluster at {where} is PostgreSQL {version} and the VM has the server "
            f"of {', '.join(seen.installed)} only: install postgresql-{version} on the VM, or "
            "upgrade the cluster (pg_upgrade) by hand; this tool does neither"
        )
    if seen.port_busy:
        return _refuse(
            f"port {db.port} on the VM is taken by another server (another PostgreSQL "
            "cluster? see `pg_lsclusters` and `sudo ss -ltnp` there): stop it, or set "
            "prefect.database.port"
        )
    if seen.server_uses == "postgresql":
        moved = _moved(db, seen)
        if moved and not db.switch:
            return _refuse(
                f"the Prefect server runs on {moved[0]}, which holds its history, and "
                f"prefect.database names {moved[1]}: set it back, or set "
                f"prefect.database.switch: true to start the server on a new, empty "
                f"{moved[1]} ({moved[0]} is kept, its history not copied)"
            )
        if seen.data != "cluster":
            return _refuse(
                f"the Prefect server's environment points at PostgreSQL, but {where} "
                "holds no cluster (another volume attached? the folder moved?): put it back; "
                "no new cluster is made in its place"
            )
        if moved:
            return _do(
                DbAction.SWITCH,
                f"move the Prefect server from {moved[0]} to a new, empty {moved[1]} in the "
                f"cluster at {where}; {moved[0]} stays as it is, its history not copied (run "
                "register afterwards for the pools, blocks and deployments)",
            )
        if seen.running:
            return _do(DbAction.KEEP, f"PostgreSQL {version} at {where}")
        return _do(DbAction.START, f"start PostgreSQL {version} at {where}")
    if seen.data == "cluster":
        if seen.server_uses == "none":
            return _do(
                DbAction.ADOPT,
                f"the volume's PostgreSQL {version} cluster at {where}: run it and point "
                "the Prefect server at it",
            )
        return _do(
            DbAction.SWITCH,
            f"finish the switch to the PostgreSQL cluster at {where}: the Prefect server "
            f"leaves SQLite ({sqlite_path} stays as it is)",
        )
    if seen.sqlite_file and not db.switch:
        return _refuse(
            f"a SQLite database with history is on the volume ({sqlite_path}); set "
            "prefect.database.switch: true to move to PostgreSQL (the SQLite file is kept; "
            "its history is not copied)"
        )
    if seen.sqlite_file:
        return _do(
            DbAction.SWITCH,
            f"switch the Prefect server from SQLite to a new PostgreSQL cluster at "
            f"{where}; {sqlite_path} stays as it is, its history not copied (run register "
            "afterwards for the pools, blocks and deployments)",
        )
    return _do(
        DbAction.INIT,
        f"a new PostgreSQL cluster at {where} for the Prefect server",
    )


def _moved(db: DatabaseSettings, seen: DbObserved) -> tuple[str, str] | None:
    """(what the server's URL names, what the settings name) when its database or role
    differs: another database would hide the server's history (a port may change)."""
    shown = (seen.server_db_name, seen.server_db_user)
    if None in shown or shown == (db.name, db.user):
        return None
    return (
        f"database {seen.server_db_name} (role {seen.server_db_user})",
        f"database {db.name} (role {db.user})",
    )


def parse_observed(output: str) -> DbObserved:
    """The ``key=value`` lines ``tasks/postgres.py: observe_script`` prints (with those of
    ``tasks/server_runs.py: runs_script``)."""
    values = key_values(output)

    def one(key: str) -> str | None:
        return values.get(key, [None])[-1]

    data = one("data") or "missing"
    port, pid_port = one("db_port") or "", one("pg_pid_port") or ""
    written = written_times(values, "pg_written_")
    return DbObserved(
        sqlite_file=one("sqlite") == "1",
        data=cast(DataState, data if data in ("missing", "empty", "cluster") else "other"),
        cluster_version=one("version") or None,
        data_owner=one("owner") or None,
        conf_included=one("included") == "1",
        installed=sorted(set(values.get("installed", [])), key=_major),
        running=one("running") == "1",
        port_listening=one("listening") == "1",
        server_uses=_server_uses(one("server")),
        server_running=one("server_running") == "1",
        server_db_user=one("db_user") or None,
        server_db_port=int(port) if port.isdigit() else None,
        server_db_name=one("db_name") or None,
        shown={name: v for name in RESTART_SETTINGS if (v := one(f"pg_{name}")) is not None},
        running_port=int(pid_port) if pid_port.isdigit() else None,
        conf_loaded=number(one("pg_loaded")),
        cluster_started=number(one("pg_started")),
        written=written,
    )


def _major(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def _server_uses(value: str | None) -> Literal["none", "sqlite", "postgresql"]:
    if value == "postgresql":
        return "postgresql"
    return "sqlite" if value == "sqlite" else "none"


def server_version(seen: DbObserved) -> str | None:
    """The major version the cluster runs with: its own, or for a new one the newest installed."""
    if seen.cluster_version:
        return seen.cluster_version
    return seen.installed[-1] if seen.installed else None


def settings_wanted(db: DatabaseSettings) -> dict[str, str]:
    """The settings of ``RESTART_SETTINGS`` this tool gives the cluster, as ``SHOW`` prints them."""
    return {
        "port": str(db.port),
        "listen_addresses": "localhost",
        "unix_socket_directories": SOCKETS,
    }


def cluster_verb(seen: DbObserved, db: DatabaseSettings, wrote: list[str]) -> tuple[str, str]:
    """What the cluster needs for what runs to be what its files say: ("start", "restart",
    "reload" or "", and why). ``wrote``: what this run wrote ("settings", "pg_hba.conf",
    "pg_ident.conf", "unit"); the rest is read from the running cluster (the settings that
    take a restart, as ``SHOW`` gives them; when it last read its files; when its process
    started), so a run cut off between writing and restarting is finished by the next one."""
    if not seen.running:
        return "start", "started"
    differs = [
        f"{name} {seen.shown[name]} -> {value}"
        for name, value in settings_wanted(db).items()
        if name in seen.shown and seen.shown[name] != value
    ]
    if differs:
        return "restart", f"restarted ({', '.join(differs)})"
    started, unit = seen.cluster_started, seen.written.get("unit")
    if "unit" in wrote or (started is not None and unit and written_since(unit, started)):
        return "restart", "restarted for its unit"
    if "settings" in wrote and not seen.shown:  # (its running settings not read)
        return "restart", "restarted"
    loaded = seen.conf_loaded
    unread = [
        name
        for name in ("settings", "pg_hba.conf", "pg_ident.conf")
        if name in wrote or (loaded is not None and seen.written.get(name, 0) > loaded)
    ]
    if unread:
        return "reload", f"reloaded ({' and '.join(unread)})"
    return "", ""


def database_url(db: DatabaseSettings, password: str) -> str:
    """The Prefect server's connection URL (it holds the password: only for its 0600 env)."""
    return (
        f"postgresql+asyncpg://{db.user}:{quote(password, safe='')}@127.0.0.1:{db.port}/{db.name}"
    )


def password_in_env(env: str) -> str | None:
    """The database password in the server's environment file text, if it points at
    PostgreSQL."""
    for line in env.splitlines():
        name, _, value = line.partition("=")
        if name.strip() in URL_VARIABLES and value.startswith("postgresql"):
            password = urlsplit(value.strip()).password
            return unquote(password) if password else None
    return None


# -- the role's password, compared without sending it ----------------------------------------
def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (what ``pg_authid.rolpassword``
    holds, RFC 5802/7677): the role's password is set and compared through it, so the password
    itself never reaches the VM's database, its logs or a command line."""
    if not password.isascii():
        raise ValueError("the database password must be ASCII (it is compared without SASLprep)")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def verifier_matches(stored: str, password: str) -> bool:
    """Whether a role's stored verifier is that of ``password`` (an md5 or plain one never is:
    it is replaced by a SCRAM one)."""
    try:
        method, rest = stored.strip().split("$", 1)
        head, _keys = rest.split("$", 1)
        iterations, salt = head.split(":", 1)
        if method != "SCRAM-SHA-256":
            return False
        expected = scram_verifier(password, base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(expected, stored.strip())
