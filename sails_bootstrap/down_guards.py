"""What ``down --delete-volume`` asks before the volume goes: its id typed, and a copy of
the Prefect database made first (a failure deletes nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from core.config import BootstrapConfig
from sails_bootstrap.local_api import ensure_api
from sails_bootstrap.output import fail
from sails_bootstrap.running import run_flow

if TYPE_CHECKING:
    from tasks.backup import BackupRecord


def copy_before_delete(cfg: BootstrapConfig) -> BackupRecord | None:
    """The copy ``down --delete-volume`` makes first; a failure deletes nothing. On PostgreSQL,
    whose copies are not built yet, it refuses and names the copy to make by hand."""
    from flows.backup import backup
    from tasks.backup import OnPostgresError

    on_postgresql: list[str] = []

    def copy() -> BackupRecord | None:
        try:
            return backup(cfg)
        except OnPostgresError as exc:
            on_postgresql.append(str(exc))
            return None

    try:
        record = run_flow(copy, cfg, "backup")
    except typer.Exit:
        raise fail(
            "the Prefect database could not be copied off the VM (above), so nothing was "
            "deleted; fix that and run again, or pass --no-backup to delete the volume "
            "without a copy",
            code=1,
        ) from None
    if on_postgresql:
        db = cfg.prefect.database
        raise fail(
            "error: the VM's Prefect server runs on PostgreSQL, and copies of PostgreSQL "
            "(pg_dump) are not built yet, so the copy made before the volume goes cannot be "
            "made; nothing was deleted. Copy the database off the VM first: `ssh "
            f"{cfg.ssh.alias} 'cd / && sudo -u postgres pg_dump -Fc -p {db.port} {db.name}' > "
            f"{cfg.environment}-{db.name}.dump` (check it with `pg_restore -l` here), or keep "
            "the volume: `sails-bootstrap down` without --delete-volume deletes the server only",
            code=1,
        )
    return record


def typed_volume_id(cfg: BootstrapConfig, given: str | None, yes: bool) -> str:
    """The data volume is deleted only by its id, typed (or given with --volume-id): a slip of
    the flag alone deletes nothing."""
    from tasks.cloud.volume import our_volume_ids

    ensure_api()
    try:
        ids = our_volume_ids(cfg)
    except Exception as exc:
        raise fail(f"cannot list the volumes: {exc}") from None
    if not ids:
        raise fail(f"no volume {cfg.volume_name} of {cfg.environment}: nothing to delete", code=1)
    listed = ", ".join(ids)
    if given is None:
        if yes:
            raise fail(
                f"--delete-volume with --yes needs --volume-id (the volume's id: {listed}); "
                "nothing deleted"
            )
        given = typer.prompt(
            f"Volume {cfg.volume_name} ({listed}) holds the Prefect database and everything on "
            "/mnt/pspace; its Cinder snapshots go with it. Type its id to delete it"
        ).strip()
    if given not in ids:
        raise fail(
            f"{given!r} is not the id of volume {cfg.volume_name} ({listed}); nothing deleted"
        )
    return given
