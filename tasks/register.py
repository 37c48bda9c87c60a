"""Register the orchestration server's parts: the local profile, the blocks the deployments need,
and the work pools (their workers: ``tasks.workers``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import BootstrapConfig
from core.log import logger
from core.prefect_settings import WorkPool
from core.records import Action
from tasks.canfar import VM_CA_BUNDLE
from tasks.cloud import cloud_credentials
from tasks.code_on_vm import vm_config
from tasks.vm import StepRecord, planned
from tasks.vm_server import remote_client, remove_private_keys, save_remote


def ensure_local_profile(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """A Prefect profile named after the environment, pointing at the VM's API."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles(include_defaults=False)
    wanted: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        wanted[PREFECT_API_AUTH_STRING] = auth_string
    existing = profiles.profiles_by_name.get(config.environment)
    same = existing is not None and all(existing.settings.get(k) == v for k, v in wanted.items())
    if not same and apply:
        profiles.update_profile(config.environment, wanted)
        save_profiles(profiles)
    if auth_string and apply:  # the file now holds the auth string: owner only
        from prefect.settings import PREFECT_PROFILES_PATH

        path = Path(str(PREFECT_PROFILES_PATH.value())).expanduser()
        if path.exists():
            path.chmod(0o600)
    return StepRecord(
        name=f"profile {config.environment}",
        action=Action.KEEP if same else (Action.CHANGE if existing else Action.CREATE),
        applied=apply,
        reason=("" if apply or same else "pending: ")
        + f"`prefect profile use {config.environment}` talks to {url} "
        f"(while `ssh -N {config.ssh.alias}` forwards it)",
    )


def copy_blocks(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """Save the blocks the deployments need on the VM's server (secrets carried, never shown)."""
    from prefect.blocks.system import Secret

    from blocks import CanfarCredentials

    remote = vm_config(config)
    cloud, made = vm_cloud_credentials(config, cloud_credentials(config), apply)
    blocks: list[tuple[Any, str]] = [
        (Secret.load(config.prefect.auth_block), config.prefect.auth_block),
    ]
    if cloud is not None:  # None: one to make (plan mode), so not yet there to compare
        blocks.insert(0, (cloud, str(remote.cloud.credentials_block)))
    try:
        blocks.append(
            (
                CanfarCredentials.load(config.canfar.credentials_block),
                config.canfar.credentials_block,
            )
        )
    except ValueError:
        logger().warning("no CanfarCredentials block %r to copy", config.canfar.credentials_block)
    blocks = [(for_vm(b), n) for b, n in blocks]
    saved = save_remote(blocks, url, auth_string, apply)
    kept = [name for _, name in blocks if name not in saved]
    changes = [f"saved {', '.join(saved)}"] if saved else []
    if made:
        changes.append(f"made the application credential {vm_credential_name(config)} for the VM")
        if cloud is None:
            changes.append(f"saved {remote.cloud.credentials_block}")
    if remove_private_keys(url, auth_string, apply):
        changes.append("removed the SSH private key an earlier version put there")
    reason = planned(changes, apply)
    if kept:
        reason += ("; " if reason else "") + f"{', '.join(kept)} as they should be"
    return StepRecord(
        name="blocks on the VM server",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=reason,
    )


def for_vm(block: Any) -> Any:
    """The block as the VM gets it: a CA file is a path on this machine; on the VM, the bundle
    configure wrote (the system's CAs plus config.ca_bundle) takes its place."""
    from blocks import CanfarCredentials, OpenStackCredentials

    ca_fields: dict[type, str] = {OpenStackCredentials: "cacert", CanfarCredentials: "ca_bundle"}
    field = ca_fields.get(type(block))
    if field and getattr(block, field):
        return block.model_copy(update={field: VM_CA_BUNDLE})
    return block


def vm_credential_name(config: BootstrapConfig) -> str:
    """The Keystone application credential the VM uses when the operator's are a password."""
    return f"sails-{config.environment}-vm"


def vm_cloud_credentials(
    config: BootstrapConfig, cloud: Any, apply: bool = True
) -> tuple[Any | None, bool]:
    """What the VM gets to reach the cloud: never a password. An application credential is
    copied; for a password, the VM's own application credential, kept here as the block
    ``ENV-vm-cloud`` so that later runs reuse it instead of making another. With
    ``apply=False``, Keystone is only read: ``(None, True)`` when one would be made."""
    from blocks import OpenStackCredentials

    local = f"{config.environment}-vm-cloud"
    try:
        kept = OpenStackCredentials.load(local)
    except ValueError:
        kept = None
    if not apply:
        name = vm_credential_name(config)
        if not cloud.delegated_is_current(name, kept, config.environment):
            return None, True
        return (cloud if cloud.auth_type == "v3applicationcredential" else kept), False
    creds, made = cloud.delegated(vm_credential_name(config), kept, config.environment)
    if made:
        creds.save(local, overwrite=True)
        logger().info(
            "made the application credential %s for the VM (kept as block %s)",
            vm_credential_name(config),
            local,
        )
    return creds, made


@dataclass(frozen=True)
class PoolChange:
    """One pool to create (``create``) and/or whose concurrency limit to set (``limit``, from
    ``was``); a pool as configured gets none."""

    name: str
    create: bool
    set_limit: bool
    was: int | None
    limit: int | None

    def notes(self) -> list[str]:
        return ([f"created {self.name}"] if self.create else []) + (
            [f"{self.name} limit {self.was} -> {self.limit}"] if self.set_limit else []
        )


def decide_work_pools(wanted: list[WorkPool], listed: dict[str, int | None]) -> list[PoolChange]:
    """The changes, in the config's order, that bring the server's pools (``listed``: name:
    concurrency limit) to ``wanted``. A missing pool is created without a limit, then given
    its limit if it has one; pools not configured are left alone."""
    out = []
    for pool in wanted:
        create = pool.name not in listed
        was = None if create else listed[pool.name]
        if create or was != pool.concurrency:
            out.append(
                PoolChange(pool.name, create, was != pool.concurrency, was, pool.concurrency)
            )
    return out


def ensure_work_pools(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

    changes = []
    with remote_client(url, auth_string) as client:
        # The listing is what the UI and `prefect work-pool ls` show; a limit given only at
        # creation does not always appear there, so limits are set (and checked) by update.
        listed = {p.name: p.concurrency_limit for p in client.read_work_pools()}
        for change in decide_work_pools(config.prefect.work_pools, listed):
            if change.create and apply:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=change.name,
                        type="process",
                        description=f"{config.environment}: {change.name}",
                    )
                )
            if change.set_limit and apply:
                client.update_work_pool(change.name, WorkPoolUpdate(concurrency_limit=change.limit))
            changes += change.notes()
    return StepRecord(
        name="work pools",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply)
        or ", ".join(f"{p.name}({p.concurrency or '-'})" for p in config.prefect.work_pools),
    )
