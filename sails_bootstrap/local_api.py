"""The Prefect API the commands use: a local server started when none is configured, with its
secrets at rest kept out of its database."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from sails_bootstrap.output import fail

#: Seconds a local server may take to answer its first health check. Its first start creates
#: the database (migrations); on a 2-core machine that outlasts Prefect's own bound of 20 s.
LOCAL_SERVER_STARTUP_TIMEOUT = 300
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def ensure_api() -> None:
    """With no Prefect API configured (no profile, no PREFECT_API_URL), start the local server
    Prefect would start on the first call, now: with a bound that fits a first start, progress
    while it starts, its output in a log file, and a failure that names the fix."""
    import threading
    import time

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    if not settings.server.ephemeral.enabled:
        raise fail(
            "error: no Prefect API: set PREFECT_API_URL (or `prefect profile use` a profile "
            "that has one), or allow a local server with `prefect profile use ephemeral`",
            code=1,
        )
    timeout = (
        settings.server.ephemeral.startup_timeout_seconds
        if os.environ.get(STARTUP_TIMEOUT_ENV)
        else LOCAL_SERVER_STARTUP_TIMEOUT
    )
    log = Path(settings.home) / "local-server.log"
    server = _local_server(log)
    if server.running:
        return
    secure_local_home(Path(settings.home), settings.server.database.connection_url)
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except BaseException as exc:
            failure.append(exc)

    typer.echo(
        f"starting a local Prefect server (no profile or PREFECT_API_URL set; a first start "
        f"creates its database, up to {timeout} s)",
        err=True,
    )
    began = time.monotonic()
    thread = threading.Thread(target=start, name="local-prefect-server", daemon=True)
    umask = os.umask(0o077)  # the server process makes its database and journals 0600
    try:
        thread.start()
        while thread.is_alive():
            thread.join(10)
            if thread.is_alive():
                typer.echo(f"  still starting ({time.monotonic() - began:.0f} s)", err=True)
    finally:
        os.umask(umask)
    if failure:
        raise fail(_startup_failure(failure[0], timeout, log), code=1)
    typer.echo(
        f"local Prefect server ready at {server.api_url} ({time.monotonic() - began:.0f} s)",
        err=True,
    )


ENCRYPTION_KEY_FILE = "server-encryption.key"


def secure_local_home(home: Path, database_url: Any) -> Path:
    """The local server's secrets at rest: its home 0700, its SQLite database 0600, and the key
    that encrypts the blocks in a 0600 file beside it, not in the database it protects (Prefect
    keeps it there unless PREFECT_SERVER_ENCRYPTION_KEY is set). A key the database already
    holds is moved out, so blocks saved before stay readable. Returns the key file."""
    import sqlite3

    from blocks.ssh import write_private

    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    url = database_url.get_secret_value() if database_url is not None else ""
    db = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    if not url:
        db = home / "prefect.db"
    key_file = home / ENCRYPTION_KEY_FILE
    if not key_file.exists():
        key = None
        if db is not None and db.exists():
            with contextlib.closing(sqlite3.connect(db)) as con, con:
                row = con.execute(
                    "SELECT value FROM configuration WHERE key = 'ENCRYPTION_KEY'"
                ).fetchone()
                if row:
                    key = json.loads(row[0])["fernet_key"]
                    write_private(key_file, key)
                    con.execute("DELETE FROM configuration WHERE key = 'ENCRYPTION_KEY'")
        if key is None:
            from cryptography.fernet import Fernet

            write_private(key_file, Fernet.generate_key().decode())
    key_file.chmod(0o600)
    os.environ.setdefault("PREFECT_SERVER_ENCRYPTION_KEY", key_file.read_text().strip())
    if db is not None:
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                path.chmod(0o600)
    return key_file


def _local_server(log: Path) -> Any:
    """Prefect's own local server object, its process writing to ``log``, not the terminal."""
    from prefect.server.api.server import SubprocessASGIServer

    class LoggedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> Any:
            # The child inherits stdout/stderr when it is spawned: point them at the log for
            # that moment, so the server's own output (errors included) lands there.
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as out:
                sys.stdout.flush()
                sys.stderr.flush()
                saved = os.dup(1), os.dup(2)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                try:
                    return super()._run_uvicorn_command()
                finally:
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    os.close(saved[0])
                    os.close(saved[1])

    # The class keeps one instance per port (None: any free port) and Prefect's client asks
    # for that same one, so the server started here is the one every later call uses.
    return LoggedServer()


def _startup_failure(exc: BaseException, timeout: int, log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    said = f" (its last words: {lines[-1].strip()[:200]})" if lines else ""
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    what = f"did not answer within {timeout} s" if "Timed out" in first else f"failed: {first}"
    return (
        f"error: the local Prefect server {what}{said}; its log is {log}. Run the command again "
        f"with a longer bound ({STARTUP_TIMEOUT_ENV}=600), or start a server yourself "
        "(`prefect server start`) and point at it "
        "(`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)"
    )
