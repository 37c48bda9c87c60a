"""This package's deployments on the VM's server (prefect.yaml), deployed only when their
version (the code's and the values' digest) differs; the operators' own codebase beside them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import Counter
from typing import Any

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.prefect_settings import OWN_POOL
from core.records import Action
from tasks.code_on_vm import code_digest, code_dir, code_root, prefect_yaml
from tasks.service_user import as_service_user, service_home
from tasks.vm import VM, StepRecord
from tasks.vm_server import remote_client
from tasks.workers import WORKER_ENV


def bootstrap_pool(config: BootstrapConfig) -> str:
    """The pool this package's deployments run in (the config always lists it)."""
    return OWN_POOL


def deploy_version(config: BootstrapConfig) -> str:
    """What the deployments are made from: the code and prefect.yaml, and the values register
    fills into prefect.yaml. Set as each deployment's ``version``, it tells a deploy that would
    change nothing."""
    import hashlib

    parts = (code_digest(), *deploy_env(config).values())
    return "sails-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def deploy_env(config: BootstrapConfig) -> dict[str, str]:
    """The variables prefect.yaml reads (besides the version)."""
    return {
        "SAILS_CODE_DIR": code_dir(config),
        "SAILS_POOL": bootstrap_pool(config),
        "SAILS_HEALTH_CRON": config.prefect.health_cron,
        "SAILS_BACKUP_CRON": config.backup.cron,
    }


def listed_deployments() -> dict[str, int]:
    """The deployments prefect.yaml lists, each with how many triggers it has."""
    import yaml

    spec = yaml.safe_load(prefect_yaml().read_text())["deployments"]
    return {d["name"]: len(d.get("triggers") or []) for d in spec}


def same_versions(
    ours: list[tuple[str, str | None, Any]], wanted: dict[str, int], version: str
) -> bool:
    """Every deployment in ``wanted`` is among ``ours`` (name, version, id) at ``version``, and
    no other of ours."""
    return {name: v for name, v, _ in ours} == dict.fromkeys(wanted, version)


def automation_counts(automations: list[Any]) -> dict[Any, int]:
    """How many automations run each deployment (by id; an automation counts once)."""
    counts: Counter[Any] = Counter()
    for a in automations:
        counts.update({getattr(x, "deployment_id", None) for x in a.actions} - {None})
    return dict(counts)


def decide_deployments(
    ours: list[tuple[str, str | None, Any]],
    runs: dict[Any, int],
    wanted: dict[str, int],
    version: str,
) -> str | None:
    """Why nothing needs deploying, or None: every deployment in ``wanted`` (name: triggers) is
    among ``ours`` (name, version, id) at ``version``, no other of ours, and each is run by as
    many automations (``runs``, by deployment id) as it has triggers."""
    if not same_versions(ours, wanted, version):
        return None
    # a trigger's automation runs its deployment by id: this one, not an old one
    if any(runs.get(id_, 0) != wanted[name] for name, _, id_ in ours):
        return None
    return f"{', '.join(wanted)} as deployed ({version})"


def deployed_as(
    url: str, auth_string: str | None, version: str, wanted: dict[str, int]
) -> str | None:
    """``decide_deployments`` on what the VM's server holds (its automations read only when the
    versions already match)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with remote_client(url, auth_string) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["sails-bootstrap"]))
        )
        ours = [(d.name, d.version, d.id) for d in found]
        runs = (
            automation_counts(client.read_automations())
            if same_versions(ours, wanted, version)
            else {}
        )
    return decide_deployments(ours, runs, wanted, version)


def deploy(
    config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """`prefect deploy --all` of prefect.yaml against the VM's server, unless every deployment
    is there already at this version (then nothing is written)."""
    version = deploy_version(config)
    listed = listed_deployments()
    same = deployed_as(url, auth_string, version, listed)
    if same:
        return StepRecord(name="deployments", action=Action.KEEP, applied=apply, reason=same)
    if not apply:
        return StepRecord(
            name="deployments",
            action=Action.CHANGE,
            applied=False,
            reason=f"pending: deploy prefect.yaml at {version} (the server has another version, "
            "or not every deployment or trigger)",
        )
    env = {
        **os.environ,
        **deploy_env(config),
        "SAILS_DEPLOY_VERSION": version,
        "PREFECT_API_URL": url,
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
    wanted = list(listed)
    retired = retire_deployments(url, auth_string, wanted)
    reason = f"{', '.join(wanted)} ({version})"
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
