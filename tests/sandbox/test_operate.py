"""The whole bootstrap, the registered server, the repairs its automations trigger, and the
secrets scan of everything that left behind (one environment, bootstrapped once)."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import shlex
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from blocks.canfar import CanfarCredentials
from blocks.openstack import OpenStackCredentials
from blocks.ssh import SSHKeyPair
from core.errors import BootstrapError
from core.records import Action
from flows.bootstrap import bootstrap
from flows.operate import health_check, reauth_canfar, remount_arc
from flows.plan import plan
from flows.register import register, smoke_test, ui_check
from sandbox import layout
from tasks.access import vm_for
from tasks.arc import probe_arc
from tasks.canfar import read_vm_expiry, vm_cert_path
from tasks.cloud import cloud_credentials, open_connection
from tasks.cloud.locate import locate_vm
from tasks.code_on_vm import OLD_PTH
from tasks.deploy import deploy_version
from tasks.prefect_server import server_secrets
from tasks.vm_server import remote_api, remote_client, run_on_server
from tests.fixtures.bootstrap import (
    operator_config,
    operator_tunnel,
    released_once_waiting,
    remove_environment,
)
from tests.fixtures.capture import Capture, capturing, encodings

pytestmark = [pytest.mark.sandbox]

SERVICES_IP, MIRROR_PORT, INDEX_PORT = layout.SERVICES_IP, layout.MIRROR_PORT, layout.INDEX_PORT


SCIENCE_FLOW = """\
import os
import time

from prefect import flow


@flow(name="science-hello")
def hello(who: str = "ALMA-SAILS", seconds: float = 0, until: str = "") -> str:
    # works `seconds`, or until the file `until` exists on the VM (its work is done)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and os.path.exists(until)):
        time.sleep(0.5)
    return f"hello {who}"
"""
#: Where the operators keep their codebase on /arc (below the /arc user's home).
FLOWS_DIR = "projects/ALMA-SAILS/alma-sails-codebase/flows"

SCIENCE_YAML = """\
name: science-stand-in
pull:
- prefect.deployments.steps.set_working_directory:
    directory: /home/{user}/canfar_arc/projects/ALMA-SAILS/alma-sails-codebase/flows
deployments:
- name: hello-vm
  entrypoint: hello.py:hello
  work_pool: {{name: vm-runs}}
- name: hello-headless
  entrypoint: hello.py:hello
  work_pool: {{name: headless-runs}}
"""


def vm_client(cfg: Any, address: str) -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for_run(client: Any, deployment: str, after: dt.datetime, timeout: float = 240) -> Any:
    """The first flow run of ``deployment`` created after ``after`` that reached a final state."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=after)
            ),
        )
        final = [r for r in runs if r.state and r.state.is_final()]
        if final:
            return final[0]
        time.sleep(2)
    raise AssertionError(f"no finished run of {deployment} within {timeout} s")


def run_logs(client: Any, run: Any) -> str:
    """The run's log lines, for an assertion message."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-3000:]


@dataclass
class Operated:
    """One environment, bootstrapped once for this module's tests (a whole first boot each)."""

    cfg: Any
    out: dict[str, Any]
    #: Every packet on the sandbox's networks from before `up` until the secrets scan.
    capture: Capture


@pytest.fixture(scope="module")
def operated(tmp_path_factory, prefect_server, sandbox_cloud, canfar_sandbox) -> Iterator[Operated]:  # type: ignore[no-untyped-def]
    from sandbox import manager

    manager.up()  # every part running, in case an earlier test took the sandbox down
    # The operator signs in with a password: the VM must get an application credential instead.
    OpenStackCredentials.from_clouds_yaml("sandbox-password").save("t-ops-cloud", overwrite=True)
    cfg = operator_config(
        canfar_sandbox,
        "t-ops",
        tmp_path_factory.mktemp("t-ops") / "ssh",
        cloud={"credentials_block": "t-ops-cloud"},
        canfar={"smoke_test": {"enabled": True, "timeout": 120}},
        prefect={"health_cron": "0 3 * * *"},
    )
    try:
        with capturing(tmp_path_factory.mktemp("t-ops-capture")) as capture:
            yield Operated(cfg, bootstrap(cfg), capture)
    finally:
        remove_environment(cfg)


def science_codebase(cfg: Any, canfar_sandbox: Any) -> str:
    """The science stand-in's flows on /arc, as the operators keep them; its path on the VM."""
    canfar_sandbox.arc_write(f"{FLOWS_DIR}/hello.py", SCIENCE_FLOW)
    canfar_sandbox.arc_write(
        f"{FLOWS_DIR}/prefect.yaml", SCIENCE_YAML.format(user=cfg.prefect.user)
    )
    return f"~/canfar_arc/{FLOWS_DIR}"


@pytest.fixture
def tunnel() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def test_bootstrap_register_and_self_repair(
    operated: Operated, canfar_sandbox, tmp_path: Path, tunnel: contextlib.ExitStack
) -> None:  # type: ignore[no-untyped-def]
    cfg, out = operated.cfg, operated.out
    assert out["smoke"] and out["smoke"].startswith("Succeeded")
    target = locate_vm(open_connection(cfg), cfg)
    # the VM's API as an operator reaches it: through the ssh alias's forward
    url = tunnel.enter_context(operator_tunnel(cfg))
    assert url == f"http://127.0.0.1:{cfg.prefect.local_port}/api"
    auth = server_secrets(cfg)["auth_string"]

    from prefect.client.schemas.filters import DeploymentFilter

    def inventory() -> tuple[list[str], list[str], Any]:
        with remote_api(url, auth), vm_client(cfg, target.address) as client:
            deployments = client.read_deployments()
            automations = client.read_automations()
            pools = {p.name: p.concurrency_limit for p in client.read_work_pools()}
        names = sorted(d.name for d in deployments)
        health = next(d for d in deployments if d.name == "health-check")
        return names, sorted(a.name for a in automations), (health, pools)

    names, automations, (health, pools) = inventory()
    assert names == ["backup", "bootstrap", "health-check", "reauth-canfar", "remount-arc"]
    assert len(automations) == 2
    assert [s.schedule.cron for s in health.schedules] == ["0 3 * * *"]
    assert health.pull_steps == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "/mnt/pspace/sails-bootstrap"
            }
        }
    ]
    assert pools["vm-runs"] == 2 and pools["headless-runs"] == 12, (pools, out.get("register"))

    # Nothing of this package is on the venv the science runs share (its codebase has a
    # top-level `flows` package of its own): an earlier version's .pth file is removed by the
    # next register, and our deployments import their code from their working directory (the
    # health-check runs below prove they still do).
    vm = vm_for(cfg, target)
    venv_python = f"cd / && {cfg.prefect.venv}/bin/python -c"
    site = vm.run(f"{venv_python} 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'")
    vm.write_file(f"{site.stdout.strip()}/{OLD_PTH}", "/mnt/pspace/sails-bootstrap\n")
    register(cfg)  # again: one copy of everything, the schedule kept, the .pth gone
    found = vm.run(
        f"{venv_python} 'import importlib.util as u; "
        'print([n for n in ("flows", "tasks", "blocks", "deployments", '
        '"core", "sails_bootstrap") if u.find_spec(n)])\''
    )
    assert found.stdout.strip() == "[]", found.stdout
    # This package's libraries live in its own venv, whose worker runs its pool; the
    # pipeline's venv gets Prefect and the canfar client only.
    own = vm.run(
        "cd / && /mnt/pspace/sails-bootstrap-env/bin/python -c "
        "'import openstack, fabric, canfar, prefect; print(prefect.__version__)'"
    )
    import prefect

    assert own.stdout.strip() == (cfg.prefect.version or prefect.__version__), own.stdout
    started = vm.run("systemctl show -p ExecStart prefect-worker@sails-bootstrap.service")
    assert "/mnt/pspace/sails-bootstrap-env/bin/prefect worker" in started.stdout, started.stdout
    pipeline = vm.run("systemctl show -p ExecStart prefect-worker@vm-runs.service")
    assert f"{cfg.prefect.venv}/bin/prefect worker" in pipeline.stdout, pipeline.stdout
    again, automations_again, (health_again, _) = inventory()
    assert again == names and automations_again == automations
    assert [s.schedule.cron for s in health_again.schedules] == ["0 3 * * *"]
    del DeploymentFilter

    # A register that has nothing to change writes nothing on the VM's server: no block is
    # saved again (their `updated` stays), no deploy runs (a deploy makes the triggers'
    # automations anew, with new ids). Every step says `keep`. (Deployments' and pools'
    # `updated` move with the workers' polls, so those are read by the steps' records.)
    def written() -> dict[str, Any]:
        with remote_api(url, auth), vm_client(cfg, target.address) as client:
            return {
                "deployments": {d.name: (d.id, d.version) for d in client.read_deployments()},
                "blocks": {b.name: b.updated for b in client.read_block_documents()},
                "automations": sorted(str(a.id) for a in client.read_automations()),
            }

    before = written()
    noop = register(cfg)
    changed = [f"{r.name}: {r.action} ({r.reason})" for r in noop.records if r.changed]
    assert not changed, changed
    assert written() == before
    # and the plan, which now reads the server too, has nothing to say
    settled = plan(cfg)
    assert not settled.pending and not settled.server_note, settled
    assert {r.name for r in settled.server} >= {"blocks on the VM server", "deployments"}
    ours = {name: before["deployments"][name][1] for name in names}
    assert ours == dict.fromkeys(names, deploy_version(cfg)), ours

    # A frozen /arc host: the health check on the VM fails with "stale", and the automation
    # runs remount-arc, which leaves a live mount once the host is back.
    from prefect.deployments import run_deployment

    canfar_sandbox.arc_freeze()
    try:
        with remote_api(url, auth):
            start = dt.datetime.now(dt.UTC)
            run = run_deployment("health-check/health-check", timeout=180, as_subflow=False)
            assert run.state is not None and run.state.is_failed()
            assert "stale" in (run.state.message or "")
    finally:
        canfar_sandbox.arc_thaw()
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        remount = wait_for_run(client, "remount-arc", start)
        remount_logs = run_logs(client, remount)
    assert remount.created_by is not None  # started by the automation, not by this test
    assert remount.state.is_completed(), remount_logs
    deadline = time.monotonic() + 60
    while probe_arc(vm, cfg)[0] != "live" and time.monotonic() < deadline:
        time.sleep(1)
    assert probe_arc(vm, cfg)[0] == "live"

    # An expired CANFAR certificate: the health check fails naming it, the automation runs
    # reauth-canfar, which installs a fresh one from the CanfarCredentials block.
    user = cfg.prefect.user

    def expire_certificate() -> None:
        vm.write_file(
            vm_cert_path(cfg),
            canfar_sandbox.mint_certificate(seconds=-60),
            mode="0600",
            owner=f"{user}:{user}",
        )

    expire_certificate()
    start = dt.datetime.now(dt.UTC)
    old = read_vm_expiry(vm, cfg)
    assert old is not None and old < start
    health_run = run_on_server(url, auth, "health-check/health-check", timeout=180)
    assert health_run["state"] == "Failed" and "expired" in health_run["message"], health_run
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        reauth = wait_for_run(client, "reauth-canfar", start)
        reauth_logs = run_logs(client, reauth)
    assert reauth.created_by is not None and reauth.state.is_completed(), reauth_logs
    new = read_vm_expiry(vm, cfg)
    assert new is not None and new > start + dt.timedelta(days=1)

    # The science codebase, kept on /arc as the operators keep it: `register` deploys its own
    # prefect.yaml, and the VM's workers run it from there.
    science = register(cfg, science_codebase=science_codebase(cfg, canfar_sandbox))
    assert [r.action for r in science.records if r.name == "science deployments"] == ["change"]
    for name in ("hello-vm", "hello-headless"):
        run = run_on_server(url, auth, f"science-hello/{name}", timeout=180)
        assert run["state"] == "Completed", run
    with remote_api(url, auth), vm_client(cfg, target.address) as client:
        pools = {d.name: d.work_pool_name for d in client.read_deployments()}
    assert pools["hello-vm"] == "vm-runs" and pools["hello-headless"] == "headless-runs"

    # The UI as a person sees it: health check run on the VM, log in, two screenshots.
    ui = ui_check(cfg, str(tmp_path / "ui"))
    deployments = ui.page("deployments").text
    for name in [*names, "hello-vm", "hello-headless"]:
        assert name in deployments, deployments
    assert "At 03:00 AM" in deployments, deployments  # the health check's schedule
    artifact = ui.page("health-artifact").text
    for probe in ("arc-mount", "canfar-certificate", "prefect-server", "pspace"):
        assert probe in artifact, artifact
    assert "fail" not in artifact, artifact
    for page in ui.pages:
        assert Path(page.screenshot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A failing smoke test names its cause, and deletes its session even then.
    def smoke(**settings: Any) -> str:
        changed = cfg.canfar.smoke_test.model_copy(update=settings)
        c = cfg.model_copy(update={"canfar": cfg.canfar.model_copy(update={"smoke_test": changed})})
        with pytest.raises(BootstrapError) as err:
            smoke_test(c, target)
        return str(err.value)

    assert "image: " in smoke(image="images.canfar.net/skaha/no-such-image:0")
    assert "quota: HTTP 400: Invalid value for 'cores': 64" in smoke(cores=64)  # 16 offered
    canfar_sandbox.set_failure(start_delay=60)  # the session stays Pending
    try:
        assert "timeout: still Pending" in smoke(timeout=4)
    finally:
        canfar_sandbox.set_failure()
    assert not [s for s in canfar_sandbox.sessions() if s["status"] in ("Pending", "Running")]
    canfar_sandbox.set_failure(fail_next_creates=1, status=503)
    assert "HTTP 503" in smoke()
    expire_certificate()  # the client refuses it before any request
    assert "auth: " in smoke()
    with contextlib.suppress(Exception):
        vm.close()


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
    operated: Operated, canfar_sandbox: Any, prefect_server: Any, tunnel: contextlib.ExitStack
) -> None:
    """Secrets scan: after the whole bootstrap, the registered server's own repairs, the UI and
    the smoke tests above, and a health check, a remount and a reauth from this machine, no
    private key, password, auth string, encryption key or certificate key appears in logs,
    artifacts, flow-run parameters or state messages of either Prefect server, in the VM's
    journal, or in any file that is not 0600."""
    cfg = operated.cfg
    assert operated.out["smoke"] and operated.out["smoke"].startswith("Succeeded"), operated.out
    target = locate_vm(open_connection(cfg), cfg)
    reauth_canfar(cfg)  # the smoke tests above left an expired certificate on the VM
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
    url = tunnel.enter_context(operator_tunnel(cfg))
    assert run_on_server(url, secret["auth_string"], "health-check/health-check")["state"] == (
        "Completed"
    )
    # The VM converges itself without the key that opens it: that key never went there.
    converged = run_on_server(url, secret["auth_string"], "bootstrap/bootstrap", timeout=600)
    assert converged["state"] == "Completed", converged
    with remote_client(url, secret["auth_string"]) as client:
        kinds = sorted({d.block_type.slug for d in client.read_block_documents() if d.block_type})
    assert "ssh-key-pair" not in kinds, kinds
    # ... nor the operator's OpenStack password: the VM's own application credential, which
    # the bootstrap run above used to reach the cloud.
    with remote_client(url, secret["auth_string"]) as client:
        vm_cloud = client.read_block_document_by_name(
            str(cfg.cloud.credentials_block), "openstack-credentials", include_secrets=True
        ).data
    assert vm_cloud["auth_type"] == "v3applicationcredential" and not vm_cloud.get("password")

    key = cast(SSHKeyPair, SSHKeyPair.load(cfg.ssh.key_block)).private_key.get_secret_value()
    arc_key = cast(SSHKeyPair, SSHKeyPair.load(str(cfg.arc.key_block)))
    canfar = cast(CanfarCredentials, CanfarCredentials.load(cfg.canfar.credentials_block))
    assert canfar.password is not None
    cert_pem = vm.run(f"cat {vm_cert_path(cfg)}", sudo=True).stdout
    needles = {
        "the VM's private key": pem_needles(key)[0],
        "the /arc private key": pem_needles(arc_key.private_key.get_secret_value())[0],
        "the CANFAR password": canfar.password.get_secret_value(),
        "the API auth string": secret["auth_string"].split(":", 1)[1],
        "the server's encryption key": secret["encryption_key"],
        "the certificate's key": pem_needles(cert_pem.split("-----END CERTIFICATE-----")[1])[0],
    }
    cloud = cloud_credentials(cfg)
    assert cloud.password is not None
    needles["the OpenStack password"] = cloud.password.get_secret_value()
    needles["the VM's application credential"] = str(vm_cloud["application_credential_secret"])

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

    # The sandbox's networks, captured since before `up`: the bootstrap, the UI check, the
    # health check, remount and reauth above, the VM's own deployments. Two markers sent in
    # cleartext on purpose (one from the VM over the tenant network, one from here, each
    # longer than a TCP segment) show that the capture would see a secret sent the same way.
    markers = {"marker from the VM": "vm" + os.urandom(1500).hex()}
    markers["marker from here"] = "here" + os.urandom(1500).hex()
    probe = vm_for(cfg, target)
    try:
        probe.run(
            f"exec 3<>/dev/tcp/{SERVICES_IP}/{MIRROR_PORT}; printf 'GET /%s HTTP/1.0\\r\\n\\r\\n'"
            f" {markers['marker from the VM']} >&3; cat <&3 >/dev/null",
            timeout=30,
        )
    finally:
        probe.close()
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(
            f"http://{SERVICES_IP}:{INDEX_PORT}/{markers['marker from here']}", timeout=10
        )
    operated.capture.stop()
    assert operated.capture.dropped and not any(operated.capture.dropped.values())
    wire = {what: encodings(n) for what, n in needles.items()}
    auth_user, auth_password = secret["auth_string"].split(":", 1)
    wire["the API auth string"] = encodings(auth_password, auth_user)
    wire["the CANFAR password"] = encodings(canfar.password.get_secret_value(), canfar.username)
    seen = operated.capture.find({**wire, **{w: [m] for w, m in markers.items()}})
    for what in markers:
        assert any(f.startswith(f"{what} in ") for f in seen), (what, seen)
    assert [w for w in seen if not w.startswith("marker")] == []
    # ... and the cloud was reached, over TLS, both from here and from the VM (its own
    # bootstrap run above used its application credential): every stream to Keystone is TLS
    # records (22 handshake, 23 data, 21 alert), new ones open with a handshake.
    keystone = [
        (src, data[:2])
        for (src, _, dst, dport), data in operated.capture.streams().items()
        if (dst, dport) == (SERVICES_IP, 5000)
    ]
    assert keystone and all(head in (b"\x16\x03", b"\x17\x03", b"\x15\x03") for _, head in keystone)
    from_vm = {head for src, head in keystone if src != SERVICES_IP}
    from_here = {head for src, head in keystone if src == SERVICES_IP}
    assert b"\x16\x03" in from_vm and b"\x16\x03" in from_here, keystone[:5]


def lock_from_elsewhere(cfg: Any, holder: str) -> Any:
    """The VM's lock held by an SSH session of another machine's run (as the product holds it),
    through the managed alias; returns once the lock is held."""
    import subprocess

    from tasks.vm_lock import lock_script

    other = subprocess.Popen(
        [
            "ssh", "-F", str(Path(cfg.ssh.config_dir) / "config"), cfg.ssh.alias,
            f"sh -c {shlex.quote(lock_script(holder, 0))}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    assert other.stdout is not None and other.stdout.readline().strip() == "locked"
    return other


def test_one_changing_run_on_the_vm_at_a_time(
    operated: Operated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's own lock spans machines: a run holding it from another machine (here an SSH
    session, as the product holds it) makes reauth wait and then refuse naming the holder,
    with nothing changed; once that session is gone, reauth runs."""
    from core.errors import LockHeldOnVM

    cfg = operated.cfg
    target = locate_vm(open_connection(cfg), cfg)
    vm = vm_for(cfg, target)
    before = read_vm_expiry(vm, cfg)
    other = lock_from_elsewhere(cfg, "`up` from another laptop")
    try:
        monkeypatch.setenv("SAILS_BOOTSTRAP_LOCK_WAIT", "3")
        with pytest.raises(LockHeldOnVM, match="`up` from another laptop"):
            reauth_canfar(cfg)
        assert read_vm_expiry(vm, cfg) == before  # refused before it changed anything
    finally:
        other.kill()  # the other machine's connection drops: its lock goes with it
        other.wait()
    assert reauth_canfar(cfg).action == Action.CHANGE
    vm.close()


def test_a_silent_session_frees_the_vm_lock(
    operated: Operated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose machine goes silent (a laptop lid closed, a network gone; no FIN, no RST)
    holds the VM's lock only until the VM's sshd gives up on it (configure's keepalive: a few
    minutes), not for TCP's two hours."""
    import subprocess

    cfg = operated.cfg
    other = lock_from_elsewhere(cfg, "`up` from a laptop that went to sleep")
    sockets = subprocess.run(
        ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    (port,) = {
        line.split()[2].rsplit(":", 1)[1]
        for line in sockets.splitlines()
        if f"pid={other.pid}," in line
    }
    table = "sails-test-silence"
    nft = [
        f"add table inet {table}",
        f"add chain inet {table} out {{ type filter hook output priority 0; }}",
        f"add chain inet {table} in {{ type filter hook input priority 0; }}",
        f"add rule inet {table} out tcp sport {port} drop",
        f"add rule inet {table} in tcp dport {port} drop",
    ]
    subprocess.run(["nft", "-f", "-"], input="\n".join(nft), text=True, check=True)
    try:
        monkeypatch.setenv("SAILS_BOOTSTRAP_LOCK_WAIT", "300")
        start = time.monotonic()
        assert reauth_canfar(cfg).action == Action.CHANGE
        waited = time.monotonic() - start
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
        other.kill()
        other.wait()
    # it did wait for the silent holder, and not for TCP's hours (150 s measured on the guests)
    assert 30 < waited < 300, waited


def test_restarts_wait_for_the_runs_in_flight(
    operated: Operated, canfar_sandbox: Any, tunnel: contextlib.ExitStack
) -> None:
    """Repairs that restart a worker (register, after the worker's environment drifted) or the
    server (configure, after the server's environment drifted) pause the pools and wait for
    the science run in flight, which completes; the pools run again afterwards. Past
    prefect.drain_timeout the restart goes ahead and names the run it interrupts."""
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    from flows.configure import configure
    from tasks.prefect_server import SERVER_ENV
    from tasks.workers import WORKER_ENV

    cfg = operated.cfg
    codebase = science_codebase(cfg, canfar_sandbox)
    register(cfg, science_codebase=codebase)
    url = tunnel.enter_context(operator_tunnel(cfg))
    auth = server_secrets(cfg)["auth_string"]
    vm = vm_for(cfg, locate_vm(open_connection(cfg), cfg))

    def start(seconds: float, until: str = "") -> Any:
        with remote_api(url, auth):
            run = run_deployment(
                "science-hello/hello-vm",
                parameters={"seconds": seconds, "until": until},
                timeout=0,
                as_subflow=False,
            )
        with remote_client(url, auth) as client:
            deadline = time.monotonic() + 120
            while (state := client.read_flow_run(run.id).state) and state.type != StateType.RUNNING:
                assert time.monotonic() < deadline, state
                time.sleep(1)
        return run

    def final(run: Any, timeout: float = 180) -> Any:
        with remote_client(url, auth) as client:
            deadline = time.monotonic() + timeout
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert time.monotonic() < deadline, state
                time.sleep(2)
            paused = [p.name for p in client.read_work_pools() if p.is_paused]
        return state, paused

    def drift(path: str) -> None:
        vm.run(f"echo '# edited by hand' >> {path}", sudo=True)

    def repaired_around_a_run(drifted: str, repair: Any) -> tuple[Any, Any]:
        """``repair()`` of the file ``drifted`` while a science run works; the run's work ends
        only once the repair has paused the pools and is waiting for it. (The run, the
        repair's result.)"""
        marker = f"/tmp/sails-test-done-{os.urandom(4).hex()}"
        run = start(600, until=marker)
        drift(drifted)

        with remote_client(url, auth) as client:
            released = released_once_waiting(
                repair,
                lambda: any(p.is_paused for p in client.read_work_pools()),
                lambda: vm.run(f"touch {marker}"),
                "the repair, for the run in flight,",
                timeout=300,
            )
        return run, released

    try:
        # a worker restart
        run, registered = repaired_around_a_run(
            WORKER_ENV, functools.partial(register, cfg, science_codebase=codebase)
        )
        workers = next(r for r in registered.records if r.name == "workers")
        assert "restarted vm-runs" in workers.reason, workers.reason
        assert f"run(s) in flight ({run.name})" in workers.reason, workers.reason
        state, paused = final(run)
        assert state.type == StateType.COMPLETED, state
        assert paused == []

        # a server restart
        run, configured = repaired_around_a_run(SERVER_ENV, functools.partial(configure, cfg))
        server = next(r for r in configured.records if r.name == "prefect server")
        assert "restarted" in server.reason and run.name in server.reason, server.reason
        state, paused = final(run)
        assert state.type == StateType.COMPLETED, state
        assert paused == []

        # the time box
        run = start(600)
        drift(WORKER_ENV)
        boxed = cfg.model_copy(
            update={"prefect": cfg.prefect.model_copy(update={"drain_timeout": 5})}
        )
        workers = next(
            r for r in register(boxed, science_codebase=codebase).records if r.name == "workers"
        )
        assert "interrupted 1 run(s) still in flight after" in workers.reason, workers.reason
        assert run.name in workers.reason
    finally:
        with remote_client(url, auth) as client:  # nothing left running for later tests
            for leftover in client.read_flow_runs():
                if leftover.state and leftover.state.type == StateType.RUNNING:
                    client.set_flow_run_state(leftover.id, Cancelled(), force=True)
        vm.close()


def test_backup_off_the_cloud_and_restore(
    operated: Operated,
    prefect_server: Any,
    canfar_sandbox: Any,
    tmp_path: Path,
    tunnel: contextlib.ExitStack,
) -> None:
    """The VM's scheduled backup deployment and `sails-bootstrap backup` put copies of the
    Prefect database on CANFAR /arc (the stand-in's storage, off the VM) while the server runs;
    the health check reports their age; `restore` puts the newest back: what was written since
    is gone, what the copy held is there, the database it replaced is kept on the VM, the server
    is healthy. With backup.destination local the copy comes to this machine (0600), old ones
    go past backup.keep, and a truncated copy is refused before anything is touched."""
    import shutil
    import subprocess
    import sys

    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    from core.config import dump_config
    from sandbox.canfar import arc as arc_store
    from tasks.backup import arc_folder
    from tasks.backup_store import arc_copies

    cfg = operated.cfg
    url = tunnel.enter_context(operator_tunnel(cfg))
    auth = server_secrets(cfg)["auth_string"]

    def cli(config: Any, *args: str, ok: bool = True) -> str:
        cfg_file = tmp_path / f"{config.backup_destination}.yaml"
        cfg_file.write_text(dump_config(config))
        proc = subprocess.run(
            [sys.executable, "-m", "sails_bootstrap.cli", *args, "--config", str(cfg_file)],
            env={**os.environ, **prefect_server.env()},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    def marker(value: str | None = None, after: bool = False) -> str | None:
        with remote_client(url, auth) as client:
            if after:
                client.create_variable(VariableCreate(name="sails-after", value="after"))
            if value is not None:
                if client.read_variable_by_name("sails-marker") is None:
                    client.create_variable(VariableCreate(name="sails-marker", value=value))
                else:
                    client.update_variable(VariableUpdate(name="sails-marker", value=value))
            found = client.read_variable_by_name("sails-marker")
            assert (client.read_variable_by_name("sails-after") is not None) == after
            return found.value if found else None

    reauth_canfar(cfg)  # an earlier test may leave a short-lived certificate behind
    vm = vm_for(cfg, locate_vm(open_connection(cfg), cfg))
    try:
        marker("in the copy")
        # /arc outlives environments: copies an earlier run of this test left go first
        relative = arc_folder(cfg).split("/canfar_arc/", 1)[1]
        stored = arc_store.ROOT / relative
        shutil.rmtree(stored, ignore_errors=True)
        before = arc_copies(vm, cfg)
        assert before == []
        # on the VM's schedule (run now): its worker writes the copy to /arc
        assert run_on_server(url, auth, "backup/backup", timeout=300)["state"] == "Completed"
        assert len(arc_copies(vm, cfg)) == len(before) + 1
        out = cli(cfg, "backup")  # from this machine, to the same place
        (newest,) = [line for line in out.splitlines() if line.startswith("backup: ")]
        names = arc_copies(vm, cfg)
        assert len(names) == len(before) + 2 and names[-1] in newest, (names, out)
        # in CANFAR's storage itself, beside its record
        assert sorted(p.name for p in stored.iterdir()) == sorted(
            [*names, *(n.removesuffix(".db.gz") + ".json" for n in names)]
        )
        rows = {row["probe"]: row for row in health_check(cfg).results}
        assert rows["backup"]["status"] == "ok", rows["backup"]
        assert f"({len(names)} kept)" in rows["backup"]["detail"], rows["backup"]

        marker("after the copy", after=True)  # written after the copy: the restore undoes it
        out = cli(cfg, "restore", "--yes")
        assert f"restored from {arc_folder(cfg)}/{names[-1]}" in out, out
        kept = out.split("kept on the VM: ")[1].split()[0]
        assert marker() == "in the copy"
        assert vm.run(f"test -s {shlex.quote(kept)}/prefect.db", sudo=True, check=False).ok
        assert health_check(cfg).healthy

        # to this machine instead
        here = tmp_path / "backups"
        local = cfg.model_copy(
            update={
                "backup": cfg.backup.model_copy(
                    update={
                        "destination": "local",
                        "local_dir": str(here),
                        "keep": 1,
                        "snapshots": 1,
                    }
                )
            }
        )
        first = cli(local, "backup")
        out = cli(local, "backup")
        assert "removed older copies" in out
        # a Cinder snapshot of the volume with each copy, the older one gone (snapshots: 1)
        (taken,) = [ln.split(": ")[1] for ln in first.splitlines() if "snapshot of the" in ln]
        assert f"removed older snapshots: {taken}" in out, out
        from tasks.cloud.snapshot import our_snapshots

        volume_id = locate_vm(open_connection(cfg), cfg).volume_id
        snaps = our_snapshots(open_connection(cfg), cfg, str(volume_id))
        assert [(s.status, s.name in out) for s in snaps] == [("available", True)], snaps
        (copy,) = here.glob(f"{cfg.environment}/*.db.gz")
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
        truncated = copy.with_name(f"{cfg.environment}-20260101T000000Z.db.gz")
        truncated.write_bytes(copy.read_bytes()[:500])
        record = copy.with_name(copy.name.removesuffix(".db.gz") + ".json")
        truncated.with_name(truncated.name.removesuffix(".db.gz") + ".json").write_text(
            record.read_text()
        )
        marker("after the local copy")
        out = cli(local, "restore", "--from", str(truncated), "--yes", ok=False)
        assert "cannot be unpacked" in out and marker() == "after the local copy", out
        out = cli(local, "restore", "--from", str(copy), "--yes")
        assert marker() == "in the copy", out
    finally:
        vm.close()


def test_a_lost_volume_is_rebuilt_and_its_history_restored_from_arc(
    operated: Operated, tmp_path: Path
) -> None:
    """The disaster the copies are for: the data volume is gone (deleted with the server, no
    copy made then). `up` builds the VM again on a new, empty volume; `restore` brings the
    history back from /arc: every flow run and deployment of the copy, the health check green."""
    from prefect.client.schemas.objects import StateType

    from flows.backup import backup, restore
    from flows.teardown import teardown

    cfg = operated.cfg
    reauth_canfar(cfg)
    auth = server_secrets(cfg)["auth_string"]

    def history() -> tuple[set[str], list[str]]:
        with operator_tunnel(cfg) as url, remote_client(url, auth) as client:
            runs = {
                str(r.id)
                for r in client.read_flow_runs()
                if r.state is not None and r.state.type == StateType.COMPLETED
            }
            return runs, sorted(d.name for d in client.read_deployments())

    runs, deployments = history()
    assert runs and "backup" in deployments
    copy = backup(cfg)
    assert copy is not None and copy.counts["flow_run"] >= len(runs)
    lost = locate_vm(open_connection(cfg), cfg).volume_id
    teardown(cfg, delete_data_volume=True, volume_id=lost)

    bootstrap(cfg)  # a new VM on a new, empty volume
    rebuilt = locate_vm(open_connection(cfg), cfg)
    assert rebuilt.volume_id and rebuilt.volume_id != lost
    fresh, _ = history()
    assert not runs & fresh  # none of the old history is there yet

    done = restore(cfg)
    assert done.file.endswith(copy.file.rsplit("/", 1)[-1]), done
    back, deployments_back = history()
    assert runs <= back and deployments_back == deployments
    assert health_check(cfg).healthy
