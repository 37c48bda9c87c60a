"""Registering the VM's Prefect server: local profile, blocks, work pools, workers, deployments."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.config import BootstrapConfig, dump_config
from core.errors import BootstrapError
from core.log import logger
from core.records import Action
from tasks.canfar import VM_CA_BUNDLE, vm_env_path
from tasks.cloud import cloud_credentials
from tasks.drain import drained
from tasks.service_user import as_service_user, service_home
from tasks.vm import MANAGED, VM, VM_TASK, StepRecord

PACKAGES = ("core", "blocks", "tasks", "flows", "deployments")
WORKER_UNIT = "prefect-worker@.service"
WORKER_ENV = "/etc/sails-bootstrap/prefect-worker.env"


def code_root() -> Path:
    """The folder holding this package's top-level packages (a checkout or site-packages)."""
    import core

    return Path(core.__file__).resolve().parent.parent


def prefect_yaml() -> Path:
    """This package's prefect.yaml: inside the ``deployments`` package when installed from a
    wheel (the build puts it there), at the top of a checkout otherwise."""
    packaged = code_root() / "deployments" / "prefect.yaml"
    for candidate in (packaged, code_root() / "prefect.yaml"):
        if candidate.exists():
            return candidate
    raise BootstrapError(
        f"prefect.yaml not found ({packaged} or {code_root() / 'prefect.yaml'}): reinstall "
        "alma-sails-bootstrap from a wheel or run it from a checkout"
    )


#: The path file earlier versions put into the VM's venv (removed by ``install_code``).
OLD_PTH = "sails-bootstrap.pth"


def code_dir(config: BootstrapConfig) -> str:
    return f"{config.volume.mount_point}/sails-bootstrap"


def vm_config(config: BootstrapConfig) -> BootstrapConfig:
    """The config as the VM's flows use it: blocks named as registered on the VM's server."""
    cloud = config.cloud.model_copy(
        update={
            "credentials_block": config.cloud.credentials_block or f"{config.environment}-cloud",
            "cloud": None,
        }
    )
    return config.model_copy(update={"cloud": cloud, "ca_bundle": VM_CA_BUNDLE})


@contextmanager
def remote_api(url: str, auth_string: str | None) -> Iterator[None]:
    """This process's Prefect client pointed at the VM's server for the duration."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        updates[PREFECT_API_AUTH_STRING] = auth_string
    with temporary_settings(updates):
        yield


def remote_client(url: str, auth_string: str | None) -> Any:
    """A client of the VM's server. Explicit: inside a flow run, settings changed on the fly
    do not redirect ``get_client()``, which keeps talking to the run's own API."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url, auth_string=auth_string)


def save_remote(blocks: list[tuple[Any, str]], url: str, auth_string: str | None) -> None:
    """Save blocks on the VM's server (the async client: ``Block.save`` ignores a client)."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    async def save_all() -> None:
        async with PrefectClient(url, auth_string=auth_string) as client:
            for block, name in blocks:
                # A fresh instance: a loaded block remembers its local document id.
                fresh = type(block)(**{f: getattr(block, f) for f in type(block).model_fields})
                await fresh.asave(name, overwrite=True, client=client)

    asyncio.run(save_all())


@task(name="ensure-local-profile", cache_policy=NO_CACHE)
def ensure_local_profile(config: BootstrapConfig, url: str, auth_string: str | None) -> StepRecord:
    """A Prefect profile named after the environment, pointing at the VM's API."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles(include_defaults=False)
    wanted: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        wanted[PREFECT_API_AUTH_STRING] = auth_string
    existing = profiles.profiles_by_name.get(config.environment)
    same = existing is not None and all(existing.settings.get(k) == v for k, v in wanted.items())
    if not same:
        profiles.update_profile(config.environment, wanted)
        save_profiles(profiles)
    if auth_string:  # the file now holds the auth string: owner only
        from prefect.settings import PREFECT_PROFILES_PATH

        path = Path(str(PREFECT_PROFILES_PATH.value())).expanduser()
        if path.exists():
            path.chmod(0o600)
    return StepRecord(
        name=f"profile {config.environment}",
        action=Action.KEEP if same else (Action.CHANGE if existing else Action.CREATE),
        reason=f"`prefect profile use {config.environment}` talks to {url} "
        f"(while `ssh -N {config.ssh.alias}` forwards it)",
    )


def _digest() -> str:
    """A hash of the files' names and contents (a tarball's own bytes vary with time)."""
    import hashlib

    h = hashlib.sha256()
    root = code_root()
    sources = (f for pkg in PACKAGES for f in (root / pkg).rglob("*.py"))
    files = [prefect_yaml(), *sorted(f for f in sources if "__pycache__" not in f.parts)]
    for f in files:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tarball() -> bytes:
    buf = io.BytesIO()
    root = code_root()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for pkg in PACKAGES:
            tar.add(
                root / pkg, arcname=pkg, filter=lambda t: None if "__pycache__" in t.name else t
            )
        tar.add(prefect_yaml(), arcname="prefect.yaml")
    return buf.getvalue()


@task(name="install-code-on-vm", **VM_TASK)
def install_code(vm: VM, config: BootstrapConfig, url: str, auth_string: str | None) -> StepRecord:
    """Copy this package to the VM's volume (never onto the venv's path), write its config. The
    workers run from that directory: they restart in the new one once their runs in flight
    ended (``prefect.drain_timeout``)."""
    data = _tarball()
    digest = _digest()
    target = code_dir(config)
    q = shlex.quote(target)
    user = config.server.user
    current = vm.run(f"cat {q}/.version 2>/dev/null || true").stdout.strip()
    changed = current != digest
    drain_note = ""
    if changed:
        archive = shlex.quote(vm.upload(data))
        vm.run(
            f"rm -rf {q}.new && mkdir -p {q}.new && tar -xzf {archive} -C {q}.new"
            f" && echo {digest} > {q}.new/.version"
            f'; rc=$?; rm -rf "$(dirname {archive})"; exit $rc',
            sudo=True,
            timeout=120,
        )
        pools = [p.name for p in config.prefect.work_pools if p.workers > 0]
        with (
            remote_client(url, auth_string) as client,
            drained(client, pools, config.prefect.drain_timeout, "the workers", vm) as drain,
        ):
            vm.run(
                f"rm -rf {q}.old && (test ! -d {q} || mv {q} {q}.old) && mv {q}.new {q}"
                f" && rm -rf {q}.old && chown -R {user}:{user} {q}"
                " && (systemctl try-restart 'prefect-worker@*' || true)",
                sudo=True,
                timeout=120,
            )
        drain_note = drain.note()
    # Nothing of this package goes on the venv's path: the science pipeline's runs share the
    # venv, and its codebase has top-level packages of the same names (``flows``). Our own
    # deployments import it from their working directory (the pull step sets the code
    # directory, and Prefect puts it on the run's path, as for any project). Earlier versions
    # wrote a .pth file into the venv: it goes.
    site = (
        f"site=$({shlex.quote(config.prefect.venv)}/bin/python -c "
        "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    )
    pth = bool(vm.run(f'{site} && rm -fv "$site/{OLD_PTH}"').stdout.strip())
    cfg = vm.write_file(
        f"{target}/config.yaml", dump_config(vm_config(config)), owner=f"{user}:{user}", sudo=False
    )
    return StepRecord(
        name="code on the VM",
        action=Action.CHANGE if (changed or pth or cfg) else Action.KEEP,
        reason=f"{target} at {digest}"
        + (" (updated)" if changed else "")
        + (f"; {OLD_PTH} removed from the venv" if pth else "")
        + (f"; {drain_note}" if drain_note else ""),
    )


@task(name="copy-blocks-to-vm", cache_policy=NO_CACHE)
def copy_blocks(config: BootstrapConfig, url: str, auth_string: str | None) -> StepRecord:
    """Save the blocks the deployments need on the VM's server (secrets carried, never shown)."""
    from prefect.blocks.system import Secret

    from blocks import CanfarCredentials, OpenStackCredentials

    remote = vm_config(config)
    cloud, made = vm_cloud_credentials(config, cloud_credentials(config))
    blocks: list[tuple[Any, str]] = [
        (cloud, str(remote.cloud.credentials_block)),
        (Secret.load(config.prefect.auth_block), config.prefect.auth_block),
    ]
    try:
        blocks.append(
            (
                CanfarCredentials.load(config.canfar.credentials_block),
                config.canfar.credentials_block,
            )
        )
    except ValueError:
        logger().warning("no CanfarCredentials block %r to copy", config.canfar.credentials_block)
    # CA files are paths on this machine: on the VM, the bundle configure wrote (the system's
    # CAs plus config.ca_bundle) takes their place.
    ca_fields: dict[type, str] = {OpenStackCredentials: "cacert", CanfarCredentials: "ca_bundle"}

    def for_vm(block: Any) -> Any:
        field = ca_fields.get(type(block))
        if field and getattr(block, field):
            return block.model_copy(update={field: VM_CA_BUNDLE})
        return block

    blocks = [(for_vm(b), n) for b, n in blocks]
    save_remote(blocks, url, auth_string)
    names = ", ".join(name for _, name in blocks)
    reason = f"saved {names}"
    if made:
        reason += f"; made the application credential {vm_credential_name(config)} for the VM"
    if remove_private_keys(url, auth_string):
        reason += "; removed the SSH private key an earlier version put there"
    return StepRecord(name="blocks on the VM server", action=Action.CHANGE, reason=reason)


def vm_credential_name(config: BootstrapConfig) -> str:
    """The Keystone application credential the VM uses when the operator's are a password."""
    return f"sails-{config.environment}-vm"


def vm_cloud_credentials(config: BootstrapConfig, cloud: Any) -> tuple[Any, bool]:
    """What the VM gets to reach the cloud: never a password. An application credential is
    copied; for a password, the VM's own application credential, kept here as the block
    ``ENV-vm-cloud`` so that later runs reuse it instead of making another."""
    from blocks import OpenStackCredentials

    local = f"{config.environment}-vm-cloud"
    try:
        kept = OpenStackCredentials.load(local)
    except ValueError:
        kept = None
    creds, made = cloud.delegated(vm_credential_name(config), kept, config.environment)
    if made:
        creds.save(local, overwrite=True)
        logger().info(
            "made the application credential %s for the VM (kept as block %s)",
            vm_credential_name(config),
            local,
        )
    return creds, made


def remove_private_keys(url: str, auth_string: str | None) -> list[str]:
    """Delete every SSHKeyPair block on the VM's server: the key that opens the VM stays with
    the operator (the VM's deployments act on the VM itself)."""
    from prefect.exceptions import ObjectNotFound

    with remote_client(url, auth_string) as client:
        try:
            # The listing answers a bare 404 for an unknown type; the type read names it.
            client.read_block_type_by_slug("ssh-key-pair")
        except ObjectNotFound:  # the type was never registered there: no such block either
            return []
        found = client.read_block_documents_by_type("ssh-key-pair", include_secrets=False)
        for document in found:
            client.delete_block_document(document.id)
            logger().info("removed SSHKeyPair block %s from the VM's server", document.name)
    return sorted(str(d.name) for d in found)


@task(name="ensure-work-pools", cache_policy=NO_CACHE)
def ensure_work_pools(config: BootstrapConfig, url: str, auth_string: str | None) -> StepRecord:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

    changes = []
    with remote_client(url, auth_string) as client:
        # The listing is what the UI and `prefect work-pool ls` show; a limit given only at
        # creation does not always appear there, so limits are set (and checked) by update.
        listed = {p.name: p for p in client.read_work_pools()}
        for pool in config.prefect.work_pools:
            if pool.name not in listed:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool.name,
                        type="process",
                        description=f"{config.environment}: {pool.name}",
                    )
                )
                changes.append(f"created {pool.name}")
                current = None
            else:
                current = listed[pool.name].concurrency_limit
            if current != pool.concurrency:
                client.update_work_pool(
                    pool.name, WorkPoolUpdate(concurrency_limit=pool.concurrency)
                )
                changes.append(f"{pool.name} limit {current} -> {pool.concurrency}")
    return StepRecord(
        name="work pools",
        action=Action.CHANGE if changes else Action.KEEP,
        reason="; ".join(changes)
        or ", ".join(f"{p.name}({p.concurrency or '-'})" for p in config.prefect.work_pools),
    )


def worker_unit(config: BootstrapConfig) -> str:
    p = config.prefect
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=Prefect worker for pool %i\n"
        "After=prefect-server.service network-online.target\n"
        "Wants=prefect-server.service\n"
        f"RequiresMountsFor={p.venv}\n"
        "[Service]\n"
        f"User={config.prefect.user}\n"
        f"EnvironmentFile={WORKER_ENV}\n"
        f"EnvironmentFile=-{vm_env_path(config)}\n"
        f"WorkingDirectory={code_dir(config)}\n"
        f"ExecStart={p.venv}/bin/prefect worker start --pool %i --type process\n"
        "KillSignal=SIGINT\n"
        "TimeoutStopSec=30\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


@task(name="ensure-workers", **VM_TASK)
def ensure_workers(
    vm: VM, config: BootstrapConfig, url: str, auth_string: str | None
) -> StepRecord:
    """One systemd worker per pool (per configured count), replacing the `screen` sessions."""
    p = config.prefect
    env = [
        f"PREFECT_API_URL=http://127.0.0.1:{p.port}/api",
        f"PREFECT_HOME={p.home}",
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "DO_NOT_TRACK=1",
        f"SSL_CERT_FILE={VM_CA_BUNDLE}",
    ]
    if auth_string and p.api_auth:
        env.append(f"PREFECT_API_AUTH_STRING={auth_string}")
    changes = []
    # It holds the auth string: the pipeline's user alone reads it (systemd reads it as root,
    # and `deploy_science` sources it as that user).
    user = config.prefect.user
    env_changed = vm.write_file(
        WORKER_ENV, "\n".join(env) + "\n", mode="0600", owner=f"{user}:{user}"
    )
    unit_changed = vm.write_file(f"/etc/systemd/system/{WORKER_UNIT}", worker_unit(config))
    if unit_changed:
        vm.run("systemctl daemon-reload", sudo=True)
        changes.append("worker unit")
    restart: list[str] = []
    for pool in p.work_pools:
        if pool.workers < 1:
            continue
        unit = f"prefect-worker@{pool.name}.service"
        if not vm.run(f"systemctl is-enabled --quiet {unit}", check=False).ok:
            vm.run(f"systemctl enable {unit}", sudo=True)
            changes.append(f"enabled {pool.name}")
        if not vm.run(f"systemctl is-active --quiet {unit}", check=False).ok:
            vm.run(f"systemctl restart {unit}", sudo=True)
            changes.append(f"started {pool.name}")
        elif env_changed or unit_changed:
            restart.append(pool.name)
    if restart:  # a worker's restart ends the runs it started: they end first
        with (
            remote_client(url, auth_string) as client,
            drained(client, restart, p.drain_timeout, "the workers", vm) as drain,
        ):
            units = " ".join(f"prefect-worker@{name}.service" for name in restart)
            vm.run(f"systemctl restart {units}", sudo=True)
        changes += [f"restarted {name}" for name in restart]
        if drain.note():
            changes.append(drain.note())
    return StepRecord(
        name="workers",
        action=Action.CHANGE if changes else Action.KEEP,
        reason="; ".join(changes) or "one worker per pool running",
    )


def bootstrap_pool(config: BootstrapConfig) -> str:
    names = [p.name for p in config.prefect.work_pools]
    return "sails-bootstrap" if "sails-bootstrap" in names else names[-1]


@task(name="deploy", cache_policy=NO_CACHE)
def deploy(config: BootstrapConfig, url: str, auth_string: str | None) -> StepRecord:
    """`prefect deploy --all` of prefect.yaml against the VM's server (idempotent upserts)."""
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "SAILS_CODE_DIR": code_dir(config),
        "SAILS_POOL": bootstrap_pool(config),
        "SAILS_HEALTH_CRON": config.prefect.health_cron,
        "SAILS_BACKUP_CRON": config.backup.cron,
        "PREFECT_CLI_PROMPT": "false",
    }
    if auth_string:
        env["PREFECT_API_AUTH_STRING"] = auth_string
    root = code_root()
    yaml_path = prefect_yaml()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(yaml_path),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip()[-1500:]
        if auth_string:
            tail = tail.replace(auth_string, "****")
        raise BootstrapError(f"prefect deploy failed: {tail}")
    import yaml

    wanted = [d["name"] for d in yaml.safe_load(yaml_path.read_text())["deployments"]]
    retired = retire_deployments(url, auth_string, wanted)
    reason = ", ".join(wanted)
    if retired:
        reason += f"; removed {', '.join(retired)} (no longer in prefect.yaml)"
    return StepRecord(name="deployments", action=Action.CHANGE, reason=reason)


def retire_deployments(url: str, auth_string: str | None, wanted: list[str]) -> list[str]:
    """Delete this package's deployments (tag ``sails-bootstrap``) that prefect.yaml no longer
    lists, such as the ``teardown`` an earlier version put on the VM."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with remote_client(url, auth_string) as client:
        ours = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["sails-bootstrap"]))
        )
        retired = [d for d in ours if d.name not in wanted]
        for d in retired:
            client.delete_deployment(d.id)
            logger().info("removed deployment %s from the VM's server", d.name)
    return sorted(d.name for d in retired)


@task(name="deploy-science-codebase", **VM_TASK)
def deploy_science(vm: VM, config: BootstrapConfig, directory: str) -> StepRecord:
    """`prefect deploy --all` of the science codebase's prefect.yaml, from its folder on /arc."""
    p = config.prefect
    d = directory.replace("~", service_home(config), 1)
    found = vm.run(as_service_user(config, f"test -f {shlex.quote(d)}/prefect.yaml"), check=False)
    if not found.ok:
        return StepRecord(
            name="science deployments",
            action=Action.BLOCKED,
            reason=f"no prefect.yaml in {d} (is /arc mounted?)",
        )
    vm.run(  # as the workers' user: its /arc mount, its environment file
        as_service_user(
            config,
            f"set -a; . {WORKER_ENV}; set +a; cd {shlex.quote(d)} && "
            f"{p.venv}/bin/prefect --no-prompt deploy --all",
        ),
        timeout=900,
    )
    return StepRecord(name="science deployments", action=Action.CHANGE, reason=f"from {d}")


@task(name="run-deployment-on-vm", cache_policy=NO_CACHE)
def run_on_server(
    url: str, auth_string: str | None, name: str, timeout: float = 300
) -> dict[str, Any]:
    """Start a run of deployment ``name`` ("flow/deployment") on the VM's server and wait for
    its final state (the VM's worker runs it). Returns id, state name and message."""
    import time

    client = remote_client(url, auth_string)
    with client:
        deployment = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(deployment.id)
        logger().info("started %s on the VM's server (run %s)", name, run.id)
        deadline = time.monotonic() + timeout
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                raise BootstrapError(
                    f"{name} did not finish within {timeout:.0f} s on the VM "
                    f"(state {run.state.name if run.state else 'none'}): is its worker running? "
                    "`systemctl status 'prefect-worker@*'` on the VM"
                )
            time.sleep(2)
    assert run.state is not None
    return {"id": str(run.id), "state": run.state.name, "message": run.state.message or ""}


def latest_artifact_id(url: str, auth_string: str | None, key: str) -> str | None:
    """The id of the newest artifact under ``key`` on the VM's server."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with remote_client(url, auth_string) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(found[0].id) if found else None
