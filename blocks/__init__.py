"""Prefect blocks: configuration and secrets, each able to open its own client.

Register them with ``sails-bootstrap blocks register`` or ``prefect block register -m blocks``.
"""

from blocks.canfar import CanfarCredentials
from blocks.openstack import OpenStackCredentials
from blocks.ssh import SSHKeyPair

__all__ = ["CanfarCredentials", "OpenStackCredentials", "SSHKeyPair"]

BLOCK_TYPES = (OpenStackCredentials, SSHKeyPair, CanfarCredentials)


def register_block_types() -> list[str]:
    """Register every block type of this package with the Prefect API in use (idempotent)."""
    for block_type in BLOCK_TYPES:
        block_type.register_type_and_schema()
    return [b.get_block_type_slug() for b in BLOCK_TYPES]
