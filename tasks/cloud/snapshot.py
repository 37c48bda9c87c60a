"""Cinder snapshots of the data volume, beside the database copies (``backup.snapshots``).

A snapshot holds the whole volume as it was at that moment (crash-consistent: the database
copy made just before is the consistent one), and comes back fast as a new volume in the same
cloud. It depends on its volume: deleting the volume (`down --delete-volume`) deletes its
snapshots, and losing the project loses them. The copies on /arc are the ones that outlive both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from core.config import BootstrapConfig
from core.log import Progress, logger
from core.records import Action, Record
from tasks.cloud import MARKER, find_ours

if TYPE_CHECKING:
    from openstack.connection import Connection


class SnapshotRecord(Record):
    kind: str = "volume snapshot"
    #: ours on the volume after the run, oldest first
    kept: list[str] = Field(default_factory=list)
    #: removed for backup.snapshots
    pruned: list[str] = Field(default_factory=list)


def our_snapshots(conn: Connection, config: BootstrapConfig, volume_id: str) -> list[Any]:
    """The volume's snapshots that carry our marker, oldest first."""
    snaps = find_ours(conn.block_storage.snapshots(volume_id=volume_id), config)
    return sorted(snaps, key=lambda s: s.created_at or "")


def decide_snapshots(names: list[str], wanted: str, keep: int) -> tuple[bool, list[str]]:
    """(whether to take ``wanted``, the names to delete): ``names`` are ours, oldest first. A
    snapshot already under ``wanted`` (a retried request that had succeeded) is not taken
    again; past ``keep``, the oldest go."""
    take = wanted not in names
    after = [*names, wanted] if take else names
    return take, after[: max(0, len(after) - keep)]


def snapshot_volume(
    conn: Connection, config: BootstrapConfig, volume_id: str, name: str
) -> SnapshotRecord:
    """Take snapshot ``name`` of the data volume (while it is attached: ``force``), wait until
    Cinder has it, then delete our oldest past ``backup.snapshots``."""
    log = logger()
    keep = config.backup.snapshots
    snaps = our_snapshots(conn, config, volume_id)
    take, drop = decide_snapshots([s.name for s in snaps], name, keep)
    if take:
        snap = conn.block_storage.create_snapshot(
            volume_id=volume_id,
            name=name,
            description=f"data volume of {config.environment} at backup {name}",
            metadata={MARKER: config.environment},
            is_forced=True,
        )
        progress = Progress(f"snapshot {name}")
        conn.block_storage.wait_for_status(
            snap,
            status="available",
            failures=["error"],
            interval=2,
            wait=int(config.volume.timeout),
            callback=lambda _: progress.tick("creating"),
        )
        log.info("took snapshot %s of volume %s", name, volume_id)
    for old in [s for s in snaps if s.name in drop]:
        conn.block_storage.delete_snapshot(old.id, ignore_missing=True)
        log.info("deleted snapshot %s (backup.snapshots: %d)", old.name, keep)
    kept = [s.name for s in snaps if s.name not in drop] + ([name] if take else [])
    return SnapshotRecord(
        name=name,
        id=volume_id,
        action=Action.CREATE if take else Action.KEEP,
        reason=f"{len(kept)} kept" + (f", {len(drop)} deleted" if drop else ""),
        kept=kept,
        pruned=list(drop),
    )
