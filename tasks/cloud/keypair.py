"""The keypair: the SSHKeyPair block's public key, imported once; another key under the name is
refused, never replaced."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocks.openstack import find_or_none
from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import (
    Action,
    KeypairRecord,
)
from tasks.cloud import first_look
from tasks.cloud.facts import CloudFacts

if TYPE_CHECKING:
    from openstack.connection import Connection

    from blocks.ssh import SSHKeyPair


def same_key(a: str | None, b: str) -> bool:
    return (a or "").split()[:2] == b.split()[:2]


def decide_keypair(existing: str | None, wanted: str) -> Action:
    """KEEP when the cloud's keypair holds the block's public key (its comment aside), CREATE
    when there is none. Another key under the name is refused (``ValueError``), never
    replaced: servers booted with it would no longer let the operator in."""
    if existing is None:
        return Action.CREATE
    if not same_key(existing, wanted):
        raise ValueError("another public key")
    return Action.KEEP


def ensure_keypair(
    conn: Connection,
    config: BootstrapConfig,
    key: SSHKeyPair,
    facts: CloudFacts | None = None,
    apply: bool = True,
) -> KeypairRecord:
    """The block's public key under the environment's keypair name."""
    from openstack import exceptions as os_exc

    name = config.keypair_name
    if facts is not None and first_look():
        existing = facts.keypair
    else:
        existing = find_or_none(conn.compute.find_keypair, name)
    try:
        action = decide_keypair(
            existing.public_key if existing is not None else None, key.public_key
        )
    except ValueError:
        raise BootstrapError(
            f"keypair {name!r} holds another public key than block {config.ssh.key_block!r} "
            f"({key.fingerprint}); delete it in the cloud or use the matching key"
        ) from None
    if action == Action.KEEP:
        return KeypairRecord(name=name, id=name, fingerprint=key.fingerprint, reason="matches")
    record = KeypairRecord(
        name=name,
        id=name,
        action=Action.CREATE,
        applied=apply,
        fingerprint=key.fingerprint,
        reason="missing",
    )
    if apply:
        try:
            conn.compute.create_keypair(name=name, public_key=key.public_key)
        except os_exc.ConflictException:  # created by a concurrent or retried request
            return ensure_keypair(conn, config, key, None, apply)
        logger().info("imported keypair %s (%s)", name, key.fingerprint)
    return record
