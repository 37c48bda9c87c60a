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
    """The copy ``down --delete-volume`` makes first (of SQLite or PostgreSQL, whichever the
    server runs on); a failure deletes nothing."""
    from flows.backup import backup

    try:
        return run_flow(lambda: backup(cfg), cfg, "backup")
    except typer.Exit:
        raise fail(
            "the Prefect database could not be copied off the VM (above), so nothing was "
            "deleted; fix that and run again, or pass --no-backup to delete the volume "
            "without a copy",
            code=1,
        ) from None


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
