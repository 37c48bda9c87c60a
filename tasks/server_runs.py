"""What the VM's Prefect server runs with: read from its process, not from its files.

systemd reads the server's environment file when the unit starts, and Python its venv when the
process starts. A run cut off between writing either and restarting the server (a Ctrl-C in the
drain, a dropped connection) leaves a server running on the old ones while the files say the new;
a later run that only asks "did I change the file?" would keep it so. So the restart is decided
from the running process's start against the files' modification times, and the database the
server uses from the process's own environment (``/proc/PID/environ``); the file speaks for it
only while it is stopped.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from core.config import BootstrapConfig
    from tasks.vm import VM

SERVER_UNIT = "prefect-server.service"
SERVER_ENV = "/etc/sails-bootstrap/prefect-server.env"
SERVER_UNIT_FILE = f"/etc/systemd/system/{SERVER_UNIT}"

#: The server's environment variable for its database (PREFECT_API_DATABASE_CONNECTION_URL is
#: Prefect's older alias for it).
URL_VARIABLE = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
URL_VARIABLES = (URL_VARIABLE, "PREFECT_API_DATABASE_CONNECTION_URL")

Uses = Literal["none", "sqlite", "postgresql", "unknown"]


def started_script(unit: str, key: str) -> str:
    """``KEY=EPOCH``: when ``unit``'s main process started (nothing when it has not). systemd
    shows it in UTC here, which ``date`` reads whatever the VM's zone; ``date -d ''`` would
    read as midnight, so an empty answer prints nothing."""
    show = f"LC_ALL=C TZ=UTC systemctl show -p ExecMainStartTimestamp --value {unit} 2>/dev/null"
    return (
        f't=$({show}); case "$t" in ""|n/a) ;; '
        f'*) echo "{key}=$(LC_ALL=C TZ=UTC date -d "$t" +%s 2>/dev/null)";; esac; '
    )


def mtime_script(key: str, path: str) -> str:
    """``KEY=EPOCH.NANOS``: ``path``'s modification time (nothing when it is missing)."""
    return f'm=$(stat -c %.9Y {shlex.quote(path)} 2>/dev/null) && echo "{key}=$m"; '


def runs_script(config: BootstrapConfig) -> str:
    """One command (root, or the service user for a server of its own) printing what
    ``parse_runs`` reads. The URL's password is never printed: sed prints its other parts."""
    url = "^PREFECT_(SERVER|API)_DATABASE_CONNECTION_URL="
    parts = (
        f"s#{url}postgresql[^:]*://([^:@/]*)(:[^@/]*)?@[^/:]*(:([0-9]+))?/([A-Za-z0-9_]+).*#"
        "db_user=\\2\\ndb_port=\\5\\ndb_name=\\6#p"
    )
    return (
        f"pid=$(systemctl show -p MainPID --value {SERVER_UNIT} 2>/dev/null); "
        f'case "$pid" in ""|0) src={SERVER_ENV};; '
        "*) src=/proc/$pid/environ; echo server_running=1; "
        + started_script(SERVER_UNIT, "started")
        + ";; esac; "
        + mtime_script("written_environment", SERVER_ENV)
        + mtime_script("written_unit", SERVER_UNIT_FILE)
        + mtime_script("written_venv", f"{config.prefect.venv}/bin/prefect")
        + 'if [ -r "$src" ]; then '
        f"if tr '\\0' '\\n' < \"$src\" | grep -Eq '{url}postgresql'; then echo server=postgresql; "
        f"tr '\\0' '\\n' < \"$src\" | sed -n -E {shlex.quote(parts)}; "
        "else echo server=sqlite; fi; "
        'elif [ -e "$src" ]; then echo server=unknown; else echo server=none; fi; true'
    )


class ServerRuns(BaseModel):
    """What the server's process runs with (or its files say, while it is stopped)."""

    running: bool = False
    #: When its process started (epoch seconds, whole).
    started: float | None = None
    #: Modification times of what it reads at start: environment, unit, venv.
    written: dict[str, float] = Field(default_factory=dict)
    #: Its database: "none" (no environment yet), "unknown" (not readable to this user).
    uses: Uses = "none"
    #: The PostgreSQL role, port and database its URL names (never its password).
    db_user: str | None = None
    db_port: int | None = None
    db_name: str | None = None


def key_values(output: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values.setdefault(key, []).append(value.strip())
    return values


def number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def written_times(values: dict[str, list[str]], prefix: str) -> dict[str, float]:
    """The ``PREFIX<name>=EPOCH`` lines (``mtime_script``'s) as {name: time}."""
    return {
        key.removeprefix(prefix): t
        for key, seen in values.items()
        if key.startswith(prefix) and (t := number(seen[-1])) is not None
    }


def parse_runs(output: str) -> ServerRuns:
    """The ``key=value`` lines ``runs_script`` prints."""
    values = key_values(output)

    def one(key: str) -> str | None:
        return values.get(key, [None])[-1] or None

    uses = one("server")
    port = one("db_port")
    written = written_times(values, "written_")
    return ServerRuns(
        running=one("server_running") == "1",
        started=number(one("started")),
        written=written,
        uses=uses if uses in ("sqlite", "postgresql", "unknown") else "none",  # type: ignore[arg-type]
        db_user=one("db_user"),
        db_port=int(port) if port and port.isdigit() else None,
        db_name=one("db_name"),
    )


def written_since(mtime: float, started: float) -> bool:
    """A file written after a process started (``started`` in whole seconds, as systemd shows
    it: a file of the same second counts as read, or every restart would ask for another)."""
    return mtime >= started + 1


def stale_files(runs: ServerRuns) -> list[str]:
    """What the running server has not read: the files written since its process started."""
    if not runs.running or runs.started is None:
        return []
    return sorted(name for name, t in runs.written.items() if written_since(t, runs.started))


def restart_reason(
    active: bool,
    changed: list[str],
    stale: list[str],
    database: bool = False,
) -> str | None:
    """Why the server starts or restarts (None: it runs as it should). ``changed``: what this run
    wrote ("environment", "unit", "venv"); ``stale``: what the running process has not read
    (written by an earlier run cut off before its restart); ``database``: its PostgreSQL must
    restart, with the server stopped meanwhile."""
    if not active:
        return "started"
    if database:
        return "restarted with its PostgreSQL (stopped while the cluster restarted)"
    if changed:
        return "restarted for the new venv" if changed == ["venv"] else "restarted"
    if stale:
        return (
            f"restarted: it ran with an older {' and '.join(stale)} than the VM's "
            "(an earlier run was cut off before its restart)"
        )
    return None


def on_postgresql(uses: Uses, configured: str) -> bool:
    """Whether the server runs on PostgreSQL, from what the VM shows; only what the reader
    could not see ("unknown") is taken from the configured kind."""
    return configured == "postgresql" if uses == "unknown" else uses == "postgresql"


def server_database(vm: VM, config: BootstrapConfig) -> Uses:
    """The database the VM's server runs on: its process's, or its file's while it is stopped
    ("unknown": neither readable to ``vm``'s user)."""
    out = vm.run(runs_script(config), sudo=vm.privileged, check=False, timeout=30).stdout
    return parse_runs(out).uses
