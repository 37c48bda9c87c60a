"""How steps reach what they act on: the VM (one handle, made here), the key that opens it, and
the CANFAR credentials. Flows and other steps take these from here; none of them is a flow's."""

from __future__ import annotations

from typing import Any

from blocks.canfar import CanfarCredentials
from blocks.openstack import find_or_none
from blocks.ssh import PublicKey, SSHKeyPair
from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from tasks.blocks import load_block
from tasks.cloud import open_connection
from tasks.cloud.locate import VMTarget, locate_vm
from tasks.local_ssh import known_hosts_file
from tasks.vm import VM, LocalHost


def load_key(config: BootstrapConfig, apply: bool, on_vm: bool = False) -> Any:
    """The VM's SSHKeyPair block; created (ed25519) on the first run when it does not exist.
    On the VM itself (``on_vm``), where the private key never goes, the public key the cloud's
    keypair holds."""
    if on_vm:
        keypair = find_or_none(open_connection(config).compute.find_keypair, config.keypair_name)
        if keypair is None:
            raise BootstrapError(
                f"keypair {config.keypair_name!r} is missing in the cloud: run "
                "`sails-bootstrap provision` from the operator's machine (it holds the key)"
            )
        return PublicKey(keypair.public_key)
    try:
        return SSHKeyPair.load(config.ssh.key_block)
    except ValueError:
        key = SSHKeyPair.generate(comment=config.keypair_name, username=config.server.user)
        if apply:
            key.save(config.ssh.key_block)
            logger().info(
                "generated a new ed25519 key and saved it as SSHKeyPair block %r (%s)",
                config.ssh.key_block,
                key.fingerprint,
            )
        return key


def load_canfar(config: BootstrapConfig) -> Any:
    return load_block(
        CanfarCredentials,
        config.canfar.credentials_block,
        "create it (username + password, or a certificate) or fix canfar.credentials_block",
    )


def vm_for(config: BootstrapConfig, target: VMTarget) -> VM:
    """The handle of the VM the cloud reports: its address, the operator's key, the host keys
    read from its console (and any the config trusts)."""
    key = load_block(
        SSHKeyPair,
        config.ssh.key_block,
        "`sails-bootstrap provision` makes one, or save the VM's key under that name",
    )
    return VM(
        target.address,
        key,
        [*target.host_keys, *config.ssh.trusted_host_keys],
        known_hosts=known_hosts_file(config),
    )


def open_vm(config: BootstrapConfig, on_vm: bool) -> VM:
    """The VM's handle: this machine itself when running on the VM (its deployments), else the
    VM located in the cloud and reached over SSH."""
    if on_vm:
        return LocalHost()
    return vm_for(config, locate_vm(open_connection(config), config))
