"""Entrypoints for the deployments in prefect.yaml.

They run on the VM's workers, from the code directory that ``register`` copies there (the
deployments' pull step sets it as the working directory), and read the environment's
configuration from ``config.yaml`` beside the code: the same desired state the operator keeps,
with the names of the blocks registered on the VM's server.

There is no teardown here: a VM that deletes itself stops half-way (its floating IP leaks), and
anyone with UI access could start it. Teardown is the operator's `sails-bootstrap down`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from core.config import load_config
from core.log import logger
from flows import backup as backup_flows
from flows import bootstrap as bootstrap_flows
from flows import operate

CONFIG_FILE = "config.yaml"


@flow(name="health-check")
def health_check(config_path: str = CONFIG_FILE) -> Any:
    """Scheduled: every probe of the VM, its mounts, its server and its cloud resources."""
    return operate.health_check.fn(load_config(config_path), on_vm=True)


@flow(name="remount-arc")
def remount_arc(config_path: str = CONFIG_FILE, reason: str = "on demand") -> Any:
    """On demand, or when the health check reports a stale /arc mount."""
    return operate.remount_arc.fn(load_config(config_path), on_vm=True)


@flow(name="reauth-canfar")
def reauth_canfar(config_path: str = CONFIG_FILE, reason: str = "on demand") -> Any:
    """On demand, or when the CANFAR certificate is expiring or expired."""
    return operate.reauth_canfar.fn(load_config(config_path), on_vm=True)


@flow(name="backup")
def backup(config_path: str = CONFIG_FILE) -> Any:
    """Scheduled: the Prefect database (SQLite or PostgreSQL) copied to CANFAR /arc
    (backup.destination: arc)."""
    config = load_config(config_path)
    if config.backup_destination == "local":
        logger().info(
            "backup.destination is local: copies are made from the operator's machine "
            "(`sails-bootstrap backup`), not here"
        )
        return None
    return backup_flows.backup.fn(config, on_vm=True)


@flow(name="bootstrap")
def bootstrap(config_path: str = CONFIG_FILE) -> Any:
    """On demand: converge the whole environment again (from the VM, for repairs)."""
    return bootstrap_flows.converge_from_vm(load_config(config_path))
