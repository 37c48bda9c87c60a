"""Typed records returned by the ``ensure_*`` steps: what exists, and what was (or would be) done.

The configuration model is the spec; these records are the observed status.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class Action(StrEnum):
    KEEP = "keep"  # already as desired: nothing done
    CREATE = "create"  # did not exist: created (or would be, in plan mode)
    CHANGE = "change"  # existed but differed: fixed
    DELETE = "delete"  # removed (teardown, or duplicates of ours)
    BLOCKED = "cannot-proceed"  # differs in a way this tool must not fix by itself

    def __str__(self) -> str:
        return self.value


class Record(BaseModel):
    kind: str
    name: str
    id: str | None = None
    action: Action = Action.KEEP
    reason: str = ""
    applied: bool = True  # False in plan mode: the action was only computed

    @property
    def changed(self) -> bool:
        return self.action in (Action.CREATE, Action.CHANGE, Action.DELETE)

    def row(self) -> dict[str, str]:
        """One row of a table artifact (never holds secrets)."""
        return {
            "resource": self.kind,
            "name": self.name,
            "id": self.id or "-",
            "action": str(self.action),
            "why": self.reason or "-",
        }


class KeypairRecord(Record):
    kind: str = "keypair"
    fingerprint: str = ""


class RulesRecord(Record):
    kind: str = "security group"
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    present: list[str] = Field(default_factory=list)


class ServerRecord(Record):
    kind: str = "server"
    status: str | None = None
    fixed_ip: str | None = None
    #: Floating addresses Nova lists on the server (as of the read).
    floating_ips: list[str] = Field(default_factory=list)
    created: bool = False
    launched_at: str | None = None  # when the hypervisor started it (ISO 8601, UTC)
    host_key_fingerprints: list[str] = Field(default_factory=list)


class FloatingIPRecord(Record):
    kind: str = "floating ip"
    address: str | None = None


class VolumeRecord(Record):
    kind: str = "volume"
    size_gb: int = 0
    status: str | None = None
    fs_uuid: str | None = None  # the filesystem UUID recorded on the volume when formatted
    #: Server id → attachment id, as Cinder listed them (as of the read).
    attachments: dict[str, str] = Field(default_factory=dict)


class AttachmentRecord(Record):
    kind: str = "volume attachment"
    server_id: str | None = None
    volume_id: str | None = None
    device_hint: str | None = None
    #: Where the volume shows up in the guest, whatever name Nova guessed.
    device_path: str | None = None


class LocalSSHRecord(Record):
    kind: str = "local ssh"
    alias: str = ""
    key_file: str = ""
    # "console" (verified there), "known_hosts" (verified earlier) or "trusted" (--trust-host-key)
    host_key_check: str = ""
    host_keys: list[str] = Field(default_factory=list)  # fingerprints of the verified keys
    changes: list[str] = Field(default_factory=list)


def by_id_path(volume_id: str) -> str:
    """The stable device path of a Cinder volume in a KVM/virtio guest (serial = id[:20])."""
    return f"/dev/disk/by-id/virtio-{volume_id[:20]}"
