"""The data volume and its attachment; the filesystem's UUID recorded on the volume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocks.openstack import find_or_none
from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.poll import poll
from core.records import (
    Action,
    AttachmentRecord,
    ServerRecord,
    VolumeRecord,
    by_id_path,
)
from tasks.cloud import (
    FS_UUID_KEY,
    MARKER,
    first_look,
    open_connection,
    our_volumes,
)
from tasks.cloud.facts import CloudFacts

if TYPE_CHECKING:
    from openstack.connection import Connection


def duplicate_volumes_problem(volumes: list[Any]) -> str:
    """Two volumes of ours: one of them may hold the data, so neither is ever deleted for the
    operator; the problem names both and the fix."""
    listed = "; ".join(
        f"{v.id} ({v.status}, {v.size} GB, created {v.created_at or '?'}"
        + (
            f", attached to {', '.join(a.get('server_id', '?') for a in v.attachments)}"
            if v.attachments
            else ""
        )
        + ")"
        for v in volumes
    )
    return (
        f"{len(volumes)} volumes of this environment are named {volumes[0].name!r}: {listed}. "
        "Volumes are never deleted for you: look inside the one you do not expect (attach it, "
        "`sudo blkid`, mount it read-only), then delete it (`openstack volume delete ID`) or "
        "rename it, and run again"
    )


#: The statuses a volume rests in; any other is on its way to one of them (or to an error).
SETTLED = ("available", "in-use")


def wait_for_volume(
    conn: Connection, volume: Any, status: str | tuple[str, ...], timeout: float
) -> Any:
    """The volume once its status is ``status`` (or one of them); an error status fails."""
    from openstack import exceptions as os_exc

    wanted = (status,) if isinstance(status, str) else status

    def read() -> Any:
        current = conn.block_storage.get_volume(volume.id)
        if current.status in ("error", "error_attaching", "error_detaching"):
            raise BootstrapError(
                f"volume {current.name} ({current.id}) is in status {current.status}; check "
                "the block storage service and its quota"
            )
        return current

    return poll(
        read,
        lambda v: v.status in wanted,
        f"volume {volume.name} to be {' or '.join(wanted)}",
        timeout,
        interval=1,
        first=0.25,
        state=lambda v: str(v.status),
        timed_out=lambda v: os_exc.ResourceTimeout(
            f"volume {v.name} still {v.status} after {timeout:.0f} s"
        ),
    )


def volume_record(volume: Any, **fields: Any) -> VolumeRecord:
    """The record of a volume as Cinder gave it (name, id, size, status), with ``fields``."""
    return VolumeRecord(
        name=volume.name, id=volume.id, size_gb=volume.size, status=volume.status, **fields
    )


def decide_volume(volumes: list[Any], size_gb: int) -> tuple[Action, str, list[Any]]:
    """``volumes``: ours (a volume being deleted is on its way out: not counted; the ones that
    count are returned). One: KEEP (never resized; a smaller one is said). None: CREATE. Two:
    BLOCKED, as one of them may hold the data: the operator looks inside first."""
    live = [v for v in volumes if v.status != "deleting"]
    if len(live) > 1:
        return Action.BLOCKED, duplicate_volumes_problem(live), live
    if not live:
        return Action.CREATE, "missing", live
    volume = live[0]
    reason = f"{volume.status}, {volume.size} GB"
    if volume.size < size_gb:
        reason += f" (smaller than the {size_gb} GB asked; not resized)"
    return Action.KEEP, reason, live


def _attachments(volume: Any) -> dict[str, str]:
    return {
        str(a.get("server_id")): str(a.get("attachment_id") or a.get("id") or "")
        for a in volume.attachments or []
    }


def ensure_volume(
    conn: Connection, config: BootstrapConfig, facts: CloudFacts | None, apply: bool = True
) -> VolumeRecord:
    """The persistent volume. A second one of ours is never deleted: it may hold the data, so
    the run cannot proceed until the operator has looked inside (preflight says so first)."""
    log = logger()
    seen = facts.volumes if facts is not None and first_look() else our_volumes(conn, config)
    action, reason, vols = decide_volume(seen, config.volume.size_gb)
    if action == Action.BLOCKED:
        return volume_record(vols[0], action=Action.BLOCKED, reason=reason, applied=apply)
    if action == Action.KEEP:
        volume = vols[0]
        if apply and volume.status not in SETTLED:
            # Being made, or reserved by an attach in flight (a killed run's): either way it
            # ends available or in-use.
            volume = wait_for_volume(conn, volume, SETTLED, config.volume.timeout)
            _, reason, _ = decide_volume([volume], config.volume.size_gb)
        return volume_record(
            volume,
            fs_uuid=(volume.metadata or {}).get(FS_UUID_KEY),
            attachments=_attachments(volume),
            reason=reason,
            applied=apply,
        )
    if not apply:
        return VolumeRecord(
            name=config.volume_name,
            size_gb=config.volume.size_gb,
            action=Action.CREATE,
            reason="missing",
            applied=False,
        )
    volume = conn.block_storage.create_volume(
        name=config.volume_name,
        size=config.volume.size_gb,
        description=f"Prefect data of {config.environment} (created by {MARKER})",
        metadata={MARKER: config.environment},
    )
    log.info("creating volume %s (%s, %s GB)", volume.name, volume.id, volume.size)
    volume = wait_for_volume(conn, volume, "available", config.volume.timeout)
    return volume_record(volume, action=Action.CREATE, reason="missing")


def ensure_attachment(
    conn: Connection,
    config: BootstrapConfig,
    server: ServerRecord,
    volume: VolumeRecord,
    apply: bool = True,
) -> AttachmentRecord:
    base: dict[str, Any] = {
        "name": config.volume_name,
        "server_id": server.id,
        "volume_id": volume.id,
        "device_hint": config.volume.device_hint,
        "device_path": by_id_path(volume.id) if volume.id else None,
    }
    if volume.action == Action.BLOCKED:  # which volume is meant is the operator's call
        return AttachmentRecord(
            **base, action=Action.BLOCKED, reason="the volume cannot be chosen", applied=False
        )
    if not (server.id and volume.id):
        return AttachmentRecord(
            **base, action=Action.CREATE, reason="after creation", applied=False
        )
    if volume.status == "in-use" and server.id in volume.attachments:  # as observed
        return AttachmentRecord(**base, id=volume.attachments[server.id], reason="attached")
    # A server this run made has no attachment yet, and the volume was free moments ago:
    # nothing to read before asking (a request that got there first is met in _attach).
    fresh = apply and server.created and volume.status == "available" and first_look()
    seen = volume if fresh else _read_attachment(conn, config, server, volume, base, apply)
    if isinstance(seen, AttachmentRecord):
        return seen
    att_id = _attach(conn, config, str(server.id), str(server.name), seen)
    wait_for_volume(conn, seen, "in-use", config.volume.timeout)
    return AttachmentRecord(**base, id=att_id, action=Action.CREATE, reason="attached now")


def _read_attachment(
    conn: Connection,
    config: BootstrapConfig,
    server: ServerRecord,
    volume: VolumeRecord,
    base: dict[str, Any],
    apply: bool,
) -> AttachmentRecord | Any:
    """The attachment as the cloud has it now, when that decides the step (attached, an
    earlier request's, blocked, or the plan's answer); else the volume, free, to attach."""
    current = conn.block_storage.get_volume(str(volume.id))
    if apply and current.status not in SETTLED:
        # A request in flight (a killed run's, whose server side went on): Cinder holds the
        # volume reserved or attaching, and Nova may not list the request yet. It is let
        # settle, then judged on what it left.
        current = wait_for_volume(conn, current, SETTLED, config.volume.timeout)
    for att in current.attachments or []:
        if att.get("server_id") == server.id:
            return AttachmentRecord(**base, id=att.get("attachment_id"), reason="attached")
    # Cinder lists an attachment once it is complete; Nova's list has it from the request on.
    # A request still in flight (a killed run's, whose server side went on) is waited for.
    pending = _nova_attachment(conn, str(server.id), str(volume.id))
    if pending is not None:
        if not apply:
            return AttachmentRecord(**base, id=pending.id, reason=f"attaching ({current.status})")
        wait_for_volume(conn, current, "in-use", config.volume.timeout)
        return AttachmentRecord(**base, id=pending.id, reason="attached (an earlier request)")
    others = [a.get("server_id") for a in current.attachments or []]
    live_others = [s for s in others if find_or_none(conn.compute.find_server, s)]
    if live_others:
        return AttachmentRecord(
            **base,
            action=Action.BLOCKED,
            applied=False,
            reason=f"attached to another server ({', '.join(live_others)}); detach it there first",
        )
    if not apply:
        return AttachmentRecord(**base, action=Action.CREATE, reason="not attached", applied=False)
    if current.status != "available":
        current = wait_for_volume(conn, current, "available", config.volume.timeout)
    return current


def _attach(
    conn: Connection, config: BootstrapConfig, server_id: str, server_name: str, volume: Any
) -> str:
    """Ask Nova to attach; the attachment's id. Where another request (a killed run's) got
    there between our read and ours, that one is taken: Nova lists it from its request on,
    but Cinder may hold the volume reserved a moment before Nova shows the request, or after
    Nova gave it up. So the volume is let settle, and then either Nova lists the other
    request, or the volume is free and ours is made again."""
    from openstack import exceptions as os_exc

    def request() -> str:
        att = conn.compute.create_volume_attachment(
            server_id, volume=volume.id, device=config.volume.device_hint
        )
        logger().info("attaching volume %s to %s", volume.name, server_name)
        return str(att.id)

    try:
        return request()
    except os_exc.BadRequestException:
        earlier = _nova_attachment(conn, server_id, volume.id)
        if earlier is None:
            settled = wait_for_volume(conn, volume, SETTLED, config.volume.timeout)
            earlier = _nova_attachment(conn, server_id, volume.id)
            if earlier is None and settled.status == "available":
                return request()  # the other request gave up
            if earlier is None:
                raise
        logger().info("volume %s: an earlier attach request is completing", volume.name)
        return str(earlier.id)


def _nova_attachment(conn: Connection, server_id: str, volume_id: str) -> Any | None:
    """The server's attachment of this volume as Nova lists it (requested or complete)."""
    for att in conn.compute.volume_attachments(server_id):
        if att.volume_id == volume_id:
            return att
    return None


def delete_volume(
    conn: Connection, config: BootstrapConfig, apply: bool = True, only: str | None = None
) -> list[VolumeRecord]:
    """The environment's volume (``only``: just the one with that id)."""
    out = []
    vols = [v for v in our_volumes(conn, config) if only is None or v.id == only]
    for vol in vols:
        deleting = vol.status == "deleting"
        out.append(
            volume_record(
                vol,
                action=Action.DELETE,
                reason="already being deleted" if deleting else "teardown --delete-volume",
                applied=apply,
            )
        )
        if apply and not deleting:
            if vol.status != "available":
                wait_for_volume(conn, vol, "available", config.volume.timeout)
            # cascade: its snapshots (backup.snapshots) cannot outlive it in Cinder
            conn.block_storage.delete_volume(vol.id, ignore_missing=True, cascade=True)
    if apply:
        # Cinder deletes in the background: done means gone, so a re-run or a new volume of the
        # same name never meets a half-deleted one.
        for vol in vols:
            conn.block_storage.wait_for_delete(vol, interval=1, wait=int(config.volume.timeout))
            logger().info("deleted volume %s", vol.id)
    return out


def our_volume_ids(config: BootstrapConfig) -> list[str]:
    """The ids of the environment's volumes, for an operator to confirm one by typing it."""
    conn = open_connection(config)
    try:
        return [v.id for v in our_volumes(conn, config) if v.status != "deleting"]
    finally:
        conn.close()


def record_fs_uuid(conn: Connection, volume_id: str, uuid: str) -> None:
    """Write the data filesystem's UUID on the volume (one metadata key, nothing else touched)."""
    conn.block_storage.set_volume_metadata(volume_id, **{FS_UUID_KEY: uuid})
    logger().info("recorded filesystem %s on volume %s", uuid, volume_id)
