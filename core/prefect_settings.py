"""The configuration's sections for the VM's Prefect server (its venv, home, work pools, its
database) and for the copies of its database, with their defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from core.fields import Cron, Name, NonEmpty, Port, UserName, checked_vm_path
from core.settings import _Model


class WorkPool(_Model):
    name: Name
    concurrency: int | None = Field(default=None, ge=1)
    #: 1: a worker runs the pool (one process worker runs as many flow runs at once as the
    #: pool's limit allows); 0: none, and a running one is stopped once its runs end.
    workers: int = Field(default=1, ge=0, le=1)


#: The pool this package's own deployments run in (its worker runs from this package's venv).
OWN_POOL = "sails-bootstrap"


def _seed_pools() -> list[WorkPool]:
    return [
        WorkPool(name="pipeline-state-monitoring"),
        WorkPool(name="vm-runs", concurrency=2),
        WorkPool(name="headless-runs", concurrency=12),
        WorkPool(name=OWN_POOL),
    ]


def _pg_name(value: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        raise ValueError(
            f"{value!r} is not a PostgreSQL name this tool accepts: lowercase letters, digits "
            "and underscores, starting with a letter or underscore (no dashes), e.g. prefect"
        )
    return value


#: A PostgreSQL role or database name that needs no quoting in SQL, a URL or a shell.
PgName = Annotated[str, AfterValidator(_pg_name)]


class DatabaseSettings(_Model):
    """The Prefect server's database: SQLite in ``prefect.home`` (the default), or PostgreSQL
    from the distribution's packages with its data directory on the volume."""

    kind: Literal["sqlite", "postgresql"] = Field(
        default="sqlite",
        description="'sqlite': prefect.home/prefect.db. 'postgresql': a cluster of the VM's "
        "own PostgreSQL with its data directory on the volume, listening on the VM's loopback.",
    )
    switch: bool = Field(
        default=False,
        description="Move a server whose SQLite database holds history to PostgreSQL (the "
        "SQLite file is kept where it is; its history is not copied). Without it such a "
        "volume keeps SQLite and configure refuses.",
    )
    data_directory: str = Field(
        default="/mnt/pspace/postgres",
        description="The PostgreSQL cluster's data directory, below volume.mount_point.",
    )
    port: int = Field(
        default=5432, ge=1024, le=65535, description="Port of PostgreSQL on the VM's loopback."
    )
    name: PgName = Field(default="prefect", description="The Prefect server's database.")
    user: PgName = Field(default="prefect", description="The role the Prefect server logs in as.")
    password_block: Name = Field(
        default="sails-prefect-db",
        description="Secret block holding that role's password (made when missing).",
    )

    @field_validator("data_directory")
    @classmethod
    def _vm_path(cls, value: str) -> str:
        return checked_vm_path(value).rstrip("/")


class PrefectSettings(_Model):
    """The Prefect server run on the VM."""

    port: Port = Field(
        default=4200, description="Port of the server on the VM's loopback (never opened)."
    )
    local_port: Port = Field(
        default=4200,
        description="Port on the operator's machine the ssh alias forwards to the server "
        "(`ssh -N ALIAS`, then the UI at http://127.0.0.1:PORT).",
    )
    home: str = "/mnt/pspace/prefect-data"
    venv: str = "/mnt/pspace/prefect-env"
    user: UserName = Field(
        default="sails",
        description="System user the server, the workers (so every flow run), the /arc mount "
        "and the CANFAR certificate belong to. It has no sudo beyond starting, stopping and "
        "reading the journal of the environment's own units; `~` in arc paths is its home.",
    )
    uid: int = Field(
        default=2200,
        ge=1000,
        le=59999,
        description="uid and gid of prefect.user, fixed so a re-created VM finds the volume's "
        "files owned by the same user.",
    )
    version: Annotated[str, StringConstraints(pattern=r"^[0-9][0-9A-Za-z.+!-]{0,40}$")] | None = (
        Field(default=None, description="Prefect version for the VM; empty: the local one.")
    )
    requirements: str | None = Field(
        default=None, description="Local requirements file to install in the VM's venv."
    )
    package_index: str | None = Field(
        default=None, description="Package index URL the VM installs from (air-gapped clouds)."
    )
    api_auth: bool = Field(default=True, description="Require the API auth string.")
    auth_block: Name = Field(
        default="sails-prefect-auth", description="Secret block holding the API auth string."
    )
    work_pools: list[WorkPool] = Field(default_factory=_seed_pools)
    drain_timeout: float = Field(
        default=1800,
        ge=0,
        le=7200,
        description="Seconds a restart of the server or of a worker waits for the flow runs in "
        "flight (their pools paused meanwhile); past it the restart goes ahead and names the "
        "runs it interrupted.",
    )
    health_cron: Cron = Field(default="*/15 * * * *", description="Health check schedule.")
    database: DatabaseSettings = DatabaseSettings()

    @field_validator("home", "venv")
    @classmethod
    def _vm_paths(cls, value: str) -> str:
        return checked_vm_path(value)

    @field_validator("package_index")
    @classmethod
    def _index_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[A-Za-z0-9._~:/?#@!&*+,=%-]+", value):
            raise ValueError(f"{value!r} must be an http(s) URL without spaces, quotes, $ or ;")
        return value


class BackupSettings(_Model):
    """Copies of the VM's Prefect database, kept off the cloud."""

    destination: Literal["arc", "local"] | None = Field(
        default=None,
        description="Where copies go: 'arc' (CANFAR storage, which outlives the cloud project; "
        "the VM writes them, also on schedule) or 'local' (this machine, on demand). Empty: "
        "arc when arc.enabled.",
    )
    arc_dir: str = Field(
        default="projects/ALMA-SAILS/backups/sails-bootstrap",
        description="Folder below the /arc mount point for the copies (the mount shows /arc's "
        "root: home/USER or projects/PROJECT, where the /arc user may write).",
    )
    local_dir: NonEmpty = Field(
        default="~/.local/share/sails-bootstrap/backups",
        description="Folder on this machine for the copies (made 0700; each copy 0600).",
    )
    keep: int = Field(
        default=14, ge=1, le=1000, description="Copies kept per environment; older ones go."
    )
    snapshots: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Cinder snapshots of the data volume taken with each copy and kept (0: "
        "none). Fast to restore in this cloud, but they go with the volume and the project: "
        "the copies are the ones that outlive both.",
    )
    cron: Cron = Field(
        default="30 2 * * *", description="Schedule of the VM's backup deployment (UTC)."
    )
    max_age_hours: float = Field(
        default=48,
        gt=0,
        description="The health check fails when the newest copy is older (twice the schedule).",
    )

    @field_validator("arc_dir")
    @classmethod
    def _below_arc(cls, value: str) -> str:
        if value.startswith(("/", "~")):
            raise ValueError(f"{value!r} must be relative: a folder below arc.mount_point")
        checked_vm_path("/" + value)
        return value.strip("/")

    def local_folder(self, environment: str) -> Path:
        return Path(self.local_dir).expanduser() / environment
