"""The Prefect server's database: the decision as a table (desired kind, what the VM shows →
action), the VM's answers parsed, and the role's password compared through its SCRAM verifier."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from core.prefect_settings import DatabaseSettings
from tasks.database import (
    SOCKETS,
    DbAction,
    DbObserved,
    cluster_verb,
    database_url,
    decide_database,
    parse_observed,
    password_in_env,
    scram_verifier,
    server_version,
    verifier_matches,
)

SQLITE = "/mnt/pspace/prefect-data/prefect.db"
LITE = DatabaseSettings()
PG = DatabaseSettings(kind="postgresql")
PG_SWITCH = DatabaseSettings(kind="postgresql", switch=True)

#: What the VM shows, by name.
FRESH = DbObserved(installed=["16"])  # nothing yet
HISTORY = DbObserved(sqlite_file=True, server_uses="sqlite", installed=["16"])
CLUSTER = {"data": "cluster", "cluster_version": "16", "installed": ["16"]}
RUNNING = DbObserved(**CLUSTER, running=True, port_listening=True, server_uses="postgresql")
STOPPED = DbObserved(**CLUSTER, server_uses="postgresql")
#: A switch cut off after the cluster was made, before the server was pointed at it.
HALF_SWITCHED = DbObserved(**CLUSTER, running=True, sqlite_file=True, server_uses="sqlite")
#: A VM made again around the volume: the cluster (and the old SQLite file) on it, no server yet.
NEW_VM = DbObserved(**CLUSTER, sqlite_file=True, server_uses="none")
#: The server on PostgreSQL, its URL read: database prefect, role prefect, port 5432.
URL_SEEN = {"server_db_user": "prefect", "server_db_port": 5432, "server_db_name": "prefect"}
ON_PREFECT = RUNNING.model_copy(update=URL_SEEN)
PG_RENAMED = DatabaseSettings(kind="postgresql", name="prefect2")
PG_OTHER_ROLE = DatabaseSettings(kind="postgresql", user="sails")
PG_PORT = DatabaseSettings(kind="postgresql", port=5433)


@pytest.mark.parametrize(
    ("desired", "seen", "action", "words"),
    [
        # SQLite, the default: kept, whatever else the volume holds, unless that would hide
        # the history the server last wrote
        (LITE, FRESH, DbAction.KEEP, "SQLite at"),
        (LITE, HISTORY, DbAction.KEEP, "SQLite at"),
        (LITE, HALF_SWITCHED, DbAction.KEEP, "SQLite at"),
        (LITE, RUNNING, DbAction.REFUSE, "set prefect.database.kind: postgresql"),
        (LITE, NEW_VM, DbAction.REFUSE, "would show the older history"),
        # PostgreSQL on a volume without history: a new cluster
        (PG, FRESH, DbAction.INIT, "a new PostgreSQL cluster at /mnt/pspace/postgres"),
        (PG, DbObserved(), DbAction.INIT, "new PostgreSQL cluster"),  # in a plan, not installed
        (PG, DbObserved(data="empty", installed=["16"]), DbAction.INIT, "new"),
        (PG, DbObserved(server_uses="sqlite", installed=["16"]), DbAction.INIT, "new"),
        # ... with SQLite history: only when asked, and the file stays
        (
            PG,
            HISTORY,
            DbAction.REFUSE,
            "a SQLite database with history is on the volume (/mnt/pspace/prefect-data/"
            "prefect.db); set prefect.database.switch: true to move to PostgreSQL (the SQLite "
            "file is kept",
        ),
        (PG_SWITCH, HISTORY, DbAction.SWITCH, "stays as it is"),
        (PG, HALF_SWITCHED, DbAction.SWITCH, "finish the switch"),
        (PG_SWITCH, HALF_SWITCHED, DbAction.SWITCH, "finish the switch"),
        (PG, NEW_VM, DbAction.ADOPT, "the volume's PostgreSQL 16 cluster"),
        # the server already on PostgreSQL
        (PG, RUNNING, DbAction.KEEP, "PostgreSQL 16 at /mnt/pspace/postgres"),
        (PG_SWITCH, RUNNING, DbAction.KEEP, "PostgreSQL 16"),
        (PG, STOPPED, DbAction.START, "start PostgreSQL 16"),
        (
            PG,
            DbObserved(server_uses="postgresql", installed=["16"]),
            DbAction.REFUSE,
            "holds no cluster",
        ),
        # what must not be written over, or cannot run
        (PG, DbObserved(data="other", installed=["16"]), DbAction.REFUSE, "no PG_VERSION"),
        (
            PG,
            DbObserved(data="cluster", cluster_version="15", installed=["16"], server_uses="none"),
            DbAction.REFUSE,
            "is PostgreSQL 15 and the VM has the server of 16 only",
        ),
        # the server's URL names another database or role than the settings: its history
        # would be hidden, unless a switch is asked for; a port may move
        (
            PG_RENAMED,
            ON_PREFECT,
            DbAction.REFUSE,
            "runs on database prefect (role prefect), which holds its history, and "
            "prefect.database names database prefect2 (role prefect): set it back, or set "
            "prefect.database.switch: true",
        ),
        (PG_OTHER_ROLE, ON_PREFECT, DbAction.REFUSE, "names database prefect (role sails)"),
        (
            DatabaseSettings(kind="postgresql", name="prefect2", switch=True),
            ON_PREFECT,
            DbAction.SWITCH,
            "to a new, empty database prefect2 (role prefect) in the cluster at "
            "/mnt/pspace/postgres; database prefect (role prefect) stays as it is",
        ),
        (PG_PORT, ON_PREFECT, DbAction.KEEP, "PostgreSQL 16"),
        (PG, ON_PREFECT, DbAction.KEEP, "PostgreSQL 16"),
        (PG, DbObserved(port_listening=True, installed=["16"]), DbAction.REFUSE, "port 5432"),
        (PG, DbObserved(**CLUSTER, port_listening=True), DbAction.REFUSE, "another server"),
    ],
)
def test_the_database_decision(
    desired: DatabaseSettings, seen: DbObserved, action: DbAction, words: str
) -> None:
    decision = decide_database(desired, seen, SQLITE)
    assert decision.action == action, decision.reason
    assert words in decision.reason, decision.reason


def test_no_decision_deletes_or_moves_the_sqlite_file() -> None:
    """Every reason that mentions the SQLite file keeps it; none would remove it."""
    for desired in (LITE, PG, PG_SWITCH):
        for seen in (FRESH, HISTORY, RUNNING, STOPPED, HALF_SWITCHED, NEW_VM):
            reason = decide_database(desired, seen, SQLITE).reason.lower()
            assert not any(word in reason for word in ("delete", "remove", "rm ")), reason


def test_what_the_vm_prints_is_read() -> None:
    seen = parse_observed(
        "sqlite=1\ndata=cluster\nversion=15\nowner=postgres\nincluded=1\n"
        "installed=16\ninstalled=15\nrunning=1\nlistening=1\nserver=postgresql\n"
    )
    assert seen == DbObserved(
        sqlite_file=True,
        data="cluster",
        cluster_version="15",
        data_owner="postgres",
        conf_included=True,
        installed=["15", "16"],
        running=True,
        port_listening=True,
        server_uses="postgresql",
    )
    assert not seen.port_busy and server_version(seen) == "15"
    bare = parse_observed("sqlite=0\ndata=missing\nserver=none\n")
    assert bare == DbObserved() and server_version(bare) is None
    assert server_version(parse_observed("installed=9\ninstalled=16\ninstalled=15")) == "16"
    assert parse_observed("data=weird\nserver=mysql").data == "other"
    assert parse_observed("server=mysql").server_uses == "none"
    assert parse_observed("listening=1").port_busy


def test_the_url_and_the_password_in_the_servers_environment() -> None:
    url = database_url(PG, "a/b:c@d")
    assert url == "postgresql+asyncpg://prefect:a%2Fb%3Ac%40d@127.0.0.1:5432/prefect"
    env = f"PREFECT_HOME=/x\nPREFECT_SERVER_DATABASE_CONNECTION_URL={url}\n"
    assert password_in_env(env) == "a/b:c@d"
    older = "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://u:pw@127.0.0.1:5433/d\n"
    assert password_in_env(older) == "pw"
    assert password_in_env("PREFECT_HOME=/x\n") is None
    assert password_in_env("PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite+aiosqlite:///x") is None


def test_the_scram_verifier_is_rfc_7677s() -> None:
    """RFC 7677's exchange (user "user", password "pencil"): the verifier's StoredKey checks
    the client's proof and its ServerKey gives the server's signature, as PostgreSQL uses them."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_verifier("pencil", salt, 4096)
    method, rest = verifier.split("$", 1)
    head, keys = rest.split("$", 1)
    assert (method, head) == ("SCRAM-SHA-256", "4096:W22ZaJ0SNY7soEsUEjb6gQ==")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = (
        "n=user,r=rOprNGfwEbeRWgbNEkqO,"
        f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        f"c=biws,r={nonce}"
    ).encode()
    signature = hmac.new(server_key, auth, "sha256").digest()
    assert base64.b64encode(signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_key = bytes(
        a ^ b for a, b in zip(proof, hmac.new(stored_key, auth, "sha256").digest(), strict=True)
    )
    assert hashlib.sha256(client_key).digest() == stored_key


def test_a_role_password_is_compared_through_its_verifier() -> None:
    stored = scram_verifier("s3cret", b"0123456789abcdef")
    assert verifier_matches(stored, "s3cret")
    assert not verifier_matches(stored, "other")
    assert not verifier_matches("md5" + "0" * 32, "s3cret")  # an md5 one is replaced
    assert not verifier_matches("", "s3cret")  # no password yet
    assert not verifier_matches("SCRAM-SHA-256$x:y$z", "s3cret")  # garbled
    with pytest.raises(ValueError, match="ASCII"):
        scram_verifier("pässword", b"salt")


#: A running cluster as configured: its settings shown, its files read since.
AS_SET = DbObserved(
    **CLUSTER,
    running=True,
    shown={"port": "5432", "listen_addresses": "localhost", "unix_socket_directories": SOCKETS},
    conf_loaded=1_800_000_100.5,
    cluster_started=1_800_000_000,
    written={"settings": 1_799_000_000.0, "pg_hba.conf": 1_799_000_000.0, "unit": 1_799_000_000.0},
)


def _with(**update: object) -> DbObserved:
    return AS_SET.model_copy(update=update)


@pytest.mark.parametrize(
    ("seen", "desired", "wrote", "verb", "words"),
    [
        (AS_SET, PG, [], "", ""),
        (DbObserved(**CLUSTER), PG, ["settings"], "start", "started"),
        # this run wrote them
        (AS_SET, PG, ["pg_hba.conf"], "reload", "pg_hba.conf"),
        (AS_SET, PG, ["settings"], "reload", "settings"),  # what it sets that restarts is as shown
        (AS_SET, PG, ["unit"], "restart", "for its unit"),
        # what runs differs from the settings, whoever wrote them (a run cut off before the
        # restart): restarted
        (AS_SET, PG_PORT, [], "restart", "port 5432 -> 5433"),
        (
            _with(shown={**AS_SET.shown, "listen_addresses": "*"}),
            PG,
            [],
            "restart",
            "* -> localhost",
        ),
        (
            _with(written={**AS_SET.written, "unit": 1_800_000_050.0}),
            PG,
            [],
            "restart",
            "for its unit",
        ),
        # files written since it last read them: reloaded
        (
            _with(written={**AS_SET.written, "pg_hba.conf": 1_800_000_200.0}),
            PG,
            [],
            "reload",
            "pg_hba.conf",
        ),
        # its settings not readable (psql did not answer): what this run wrote decides
        (_with(shown={}, conf_loaded=None), PG, [], "", ""),
        (_with(shown={}, conf_loaded=None), PG, ["settings"], "restart", "restarted"),
        (_with(shown={}, conf_loaded=None), PG, ["pg_hba.conf"], "reload", "pg_hba.conf"),
    ],
)
def test_the_clusters_restart_is_decided_from_what_runs(
    seen: DbObserved, desired: DatabaseSettings, wrote: list[str], verb: str, words: str
) -> None:
    got, why = cluster_verb(seen, desired, wrote)
    assert got == verb, why
    assert words in why, why


def test_what_the_vm_prints_of_the_running_cluster_and_server_is_read() -> None:
    seen = parse_observed(
        "data=cluster\nversion=16\nrunning=1\npg_started=1800000000\npg_pid_port=5432\n"
        "pg_port=5432\n"
        "pg_listen_addresses=localhost\npg_unix_socket_directories=/var/run/postgresql\n"
        "pg_loaded=1800000100.123456\npg_written_settings=1799000000.5\n"
        "pg_written_pg_hba.conf=1799000001.5\npg_written_unit=1799000002.5\n"
        "server_running=1\nserver=postgresql\ndb_user=prefect\ndb_port=5432\ndb_name=prefect\n"
    )
    assert seen.shown == AS_SET.shown and seen.running_port == 5432
    assert (seen.conf_loaded, seen.cluster_started) == (1800000100.123456, 1800000000.0)
    assert seen.written == {
        "settings": 1799000000.5,
        "pg_hba.conf": 1799000001.5,
        "unit": 1799000002.5,
    }
    assert seen.server_running and seen.server_uses == "postgresql"
    assert (seen.server_db_user, seen.server_db_port, seen.server_db_name) == (
        "prefect",
        5432,
        "prefect",
    )
