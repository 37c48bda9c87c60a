"""Secrets scan: after a full bootstrap, a health check, a remount and a reauth (from this machine
and through the VM's own deployments), no private key, password, auth string, encryption key or
certificate key appears in logs, artifacts, flow-run parameters or state messages of either
Prefect server, in the VM's journal, or in any file that is not 0600."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, cast

import pytest

from blocks.canfar import CanfarCredentials
from blocks.ssh import SSHKeyPair
from flows.bootstrap import bootstrap
from flows.configure import vm_for
from flows.operate import health_check, reauth_canfar, remount_arc
from tasks.canfar import vm_cert_path
from tasks.cloud import locate_vm, open_connection
from tasks.prefect_server import server_secrets
from tasks.records import Action
from tasks.register import remote_client, run_on_server

pytestmark = [pytest.mark.sandbox]

#: Where the VM keeps nothing secret unless it is 0600.
VM_TREES = "/etc /home /root /mnt/pspace /tmp /var/tmp /var/log /run/systemd/system"


def pem_needles(pem: str) -> list[str]:
    """Two whole lines from the middle of a PEM body: present only where the key itself is."""
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    middle = len(body) // 2
    return [line for line in body[middle - 1 : middle + 1] if len(line) >= 40]


def server_texts(client: Any) -> dict[str, str]:
    """Everything a server shows about runs: logs, artifacts, parameters, state messages."""
    from prefect.client.schemas.filters import LogFilter

    texts: dict[str, str] = {}
    offset = 0
    while True:
        logs = client.read_logs(log_filter=LogFilter(), offset=offset, limit=200)
        for log in logs:
            texts[f"log {log.id}"] = log.message
        if len(logs) < 200:
            break
        offset += 200
    for artifact in client.read_artifacts():
        texts[f"artifact {artifact.key or artifact.id}"] = json.dumps(
            [artifact.data, artifact.description], default=str
        )
    for run in client.read_flow_runs(limit=200):
        texts[f"flow run {run.name} parameters"] = json.dumps(run.parameters, default=str)
        texts[f"flow run {run.name} state"] = (run.state.message or "") if run.state else ""
    for task_run in client.read_task_runs(limit=200):
        texts[f"task run {task_run.name} state"] = (
            (task_run.state.message or "") if task_run.state else ""
        )
    return texts


def latest_health_table(environment: str) -> list[dict[str, str]]:
    """The rows of the newest health table artifact of ``environment``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"health-{environment}"]))
        )
    data = artifact.data
    return cast(list[dict[str, str]], json.loads(data) if isinstance(data, str) else data)


def leaks(texts: dict[str, str], needles: dict[str, str]) -> list[str]:
    return [
        f"{what} in {where}"
        for where, text in texts.items()
        for what, needle in needles.items()
        if needle in text
    ]


def test_no_secret_outside_its_0600_home(
    vm_config: Any, canfar_sandbox: Any, prefect_server: Any, tmp_path: Path
) -> None:
    cfg = vm_config("t-secrets", canfar={"smoke_test": {"enabled": True, "timeout": 120}})
    out = bootstrap(cfg)
    assert out["smoke"] and out["smoke"].startswith("Succeeded"), out
    target = locate_vm.fn(open_connection(cfg), cfg)
    vm = vm_for(cfg, target)
    canfar_sandbox.arc_freeze()  # a stale /arc: the health check fails, remount repairs
    try:
        state = health_check(cfg, return_state=True)
    finally:
        canfar_sandbox.arc_thaw()
    assert state.is_failed() and "arc-mount: stale" in (state.message or ""), state.message
    # A frozen host never hangs the check: /arc is the only failing probe (df on the volume,
    # the certificate read and the rest still answer), and its own reported time is inside
    # the limit it was given.
    rows = {row["probe"]: row for row in latest_health_table(cfg.environment)}
    assert [p for p, row in rows.items() if row["status"] == "fail"] == ["arc-mount"], rows
    assert float(rows["arc-mount"]["duration"].split()[0]) <= cfg.arc.probe_timeout + 2, rows
    remount_arc(cfg)
    assert reauth_canfar(cfg).action == Action.CHANGE
    assert health_check(cfg).healthy
    secret = server_secrets(cfg)
    url = f"http://{target.address}:{cfg.prefect.port}/api"
    assert run_on_server.fn(url, secret["auth_string"], "health-check/health-check")["state"] == (
        "Completed"
    )

    key = cast(SSHKeyPair, SSHKeyPair.load(cfg.ssh.key_block)).private_key.get_secret_value()
    arc_key = cast(SSHKeyPair, SSHKeyPair.load(str(cfg.arc.key_block)))
    canfar = cast(CanfarCredentials, CanfarCredentials.load(cfg.canfar.credentials_block))
    assert canfar.password is not None
    cert_pem = vm.run(f"cat {vm_cert_path(cfg)}").stdout
    needles = {
        "the VM's private key": pem_needles(key)[0],
        "the /arc private key": pem_needles(arc_key.private_key.get_secret_value())[0],
        "the CANFAR password": canfar.password.get_secret_value(),
        "the API auth string": secret["auth_string"].split(":", 1)[1],
        "the server's encryption key": secret["encryption_key"],
        "the certificate's key": pem_needles(cert_pem.split("-----END CERTIFICATE-----")[1])[0],
    }

    # Both Prefect servers: this machine's and the VM's.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        local = server_texts(client)
    with remote_client(url, secret["auth_string"]) as client:
        remote = server_texts(client)
    assert len(local) > 100 and len(remote) > 20  # the scan saw the runs
    assert leaks(local, needles) == []
    assert leaks(remote, needles) == []

    # This machine's files: the ssh folder, the Prefect home (profiles) and the server's home.
    bad: list[str] = []
    for root in (Path(cfg.ssh.config_dir), Path(os.environ["PREFECT_HOME"]), prefect_server.home):
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            data = path.read_bytes().decode(errors="replace")
            found = [what for what, n in needles.items() if n in data]
            if found and stat.S_IMODE(path.stat().st_mode) & 0o077:
                bad.append(f"{path} ({oct(path.stat().st_mode)}): {found}")
    assert bad == []
    assert stat.S_IMODE(Path(cfg.ssh.config_dir, f"{cfg.keypair_name}.pem").stat().st_mode) == 0o600

    # The VM: its journal, and every file under the usual trees that is not 0600.
    patterns = vm.upload("\n".join(needles.values()).encode())
    try:
        journal = vm.run(
            f"journalctl --no-pager -o cat | grep -cF -f {patterns} || true", sudo=True
        ).stdout.strip()
        found = vm.run(
            f"grep -rlsF -f {patterns} {VM_TREES} 2>/dev/null | grep -v '^{os.path.dirname(patterns)}'"
            " | while read -r f; do stat -c '%a %U %n' \"$f\"; done",
            sudo=True,
            check=False,
            timeout=120,
        ).stdout.splitlines()
    finally:
        vm.run(f"rm -rf {os.path.dirname(patterns)}", sudo=True)
        vm.close()
    assert journal == "0"
    assert found, "the secrets' own homes were not found: the scan is blind"
    assert [line for line in found if not line.startswith(("600 ", "400 "))] == []
