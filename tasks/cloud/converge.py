"""The cloud side of the environment, composed once: keypair, the environment's group, volume,
an address, server, floating IP, attachment.

``converge`` is what provision runs (its steps submitted at once, so independent work overlaps
the server's build), what the health check's drift probe runs in plan mode, and what the bench
runs one step after another. How the steps are run is the caller's ``Runner``: ``inline`` here
calls them in this thread; the runners that make task runs of them (``submitted``, and
``timed``, which notes each under its task name) are beside the task wrappers, in
flows/steps.py. Which step waits for which is written here only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from core.config import BootstrapConfig
from core.records import (
    AttachmentRecord,
    FloatingIPRecord,
    KeypairRecord,
    Record,
    RulesRecord,
    ServerRecord,
    VolumeRecord,
)
from tasks.cloud.facts import CloudFacts
from tasks.cloud.floating_ip import ensure_floating_ip, reserve_floating_ip
from tasks.cloud.keypair import ensure_keypair
from tasks.cloud.secgroup import ensure_security_group
from tasks.cloud.server import ensure_server
from tasks.cloud.volume import ensure_attachment, ensure_volume

if TYPE_CHECKING:
    from openstack.connection import Connection

    from blocks.ssh import SSHKeyPair

T = TypeVar("T")


class Runner(Protocol):
    """Runs one step (a plain function of tasks/) on the results, or the futures, of others."""

    def __call__(
        self, step: Callable[..., Any], *args: Any, wait_for: list[Any] | None = None
    ) -> Any: ...


class Done(Generic[T]):
    """A step already run in this thread."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


def _resolved(args: tuple[Any, ...]) -> list[Any]:
    return [a.result() if isinstance(a, Done) else a for a in args]


def inline(step: Callable[..., Any], *args: Any, wait_for: list[Any] | None = None) -> Done[Any]:
    """Each step called in order, in this thread, without a task run of its own."""
    return Done(step(*_resolved(args)))


@dataclass
class CloudRecords:
    keypair: KeypairRecord
    rules: RulesRecord
    server: ServerRecord
    floating_ip: FloatingIPRecord
    volume: VolumeRecord
    attachment: AttachmentRecord

    def records(self) -> list[Record]:
        return [
            self.keypair,
            self.rules,
            self.server,
            self.floating_ip,
            self.volume,
            self.attachment,
        ]


def converge(
    conn: Connection,
    config: BootstrapConfig,
    key: SSHKeyPair,
    facts: CloudFacts,
    apply: bool,
    run: Runner = inline,
) -> CloudRecords:
    """Every cloud step, in the order their inputs allow: the server waits for the keypair
    and the group; the address is allocated, and the volume made, while it builds; the
    floating IP and the attachment follow the server."""
    keypair = run(ensure_keypair, conn, config, key, facts, apply)
    rules = run(ensure_security_group, conn, config, facts, apply)
    volume = run(ensure_volume, conn, config, facts, apply)
    reserved = run(reserve_floating_ip, conn, config, facts, apply)
    server = run(ensure_server, conn, config, facts, apply, rules, wait_for=[keypair])
    fip = run(ensure_floating_ip, conn, config, server, facts, reserved, apply)
    attachment = run(ensure_attachment, conn, config, server, volume, apply)
    return CloudRecords(
        keypair=keypair.result(),
        rules=rules.result(),
        server=server.result(),
        floating_ip=fip.result(),
        volume=volume.result(),
        attachment=attachment.result(),
    )
