"""The configure flow on real sandbox guests: volume, /arc, CANFAR auth, Prefect server."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from blocks.ssh import SSHKeyPair
from core.errors import BootstrapError
from core.records import Action
from flows.configure import configure
from flows.plan import plan
from flows.provision import provision
from flows.teardown import teardown
from tasks.arc import UNIT
from tasks.prefect_server import api_check, server_secrets
from tasks.service_user import UNITS_HELPER
from tests.fixtures.bootstrap import operator_tunnel, released_once_waiting, ssh_alias

pytestmark = [pytest.mark.sandbox]


def run(cfg: Any, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return ssh_alias(cfg, command, "ConnectTimeout=5", timeout=timeout)


def wait_ssh(cfg: Any, deadline: float = 90) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if run(cfg, "true", timeout=10).returncode == 0:
                return
        time.sleep(0.5)
    raise AssertionError("the VM did not come back")


@pytest.mark.timeout(1800)  # two pip installs of Prefect on the guest, a reboot, the teardown
def test_first_boot_configure_noop_drift_venv_repair_and_reboot(vm_config) -> None:  # type: ignore[no-untyped-def]
    """A stock first boot (no sshfs, no venv module, no package lists; the dpkg lock held by
    "unattended-upgrades"): the plan names what configure would do and changes nothing; configure
    waits for the lock, installs from the sandbox's mirror and sets up the volume, /arc, CANFAR
    auth and the server in one run; a second run changes nothing; drift is named and put back; a
    venv left half-made on the volume is rebuilt; a reboot brings everything back."""
    from sandbox import mirror

    cfg = vm_config("t-conf")
    # unattended-upgrades holding the dpkg lock past provisioning and the plan, until it ends
    # while configure waits (the lock's own cases are test_mirror's)
    with mirror.fault(dpkg_lock_seconds=600):
        prov = provision(cfg)
    assert prov.attachment and prov.attachment.device_path
    device = prov.attachment.device_path

    # cloud-init made the user and the host keys; no sshfs, no venv module, no package lists.
    booted = run(cfg, "cloud-init query instance_id && ls /etc/ssh/ssh_host_ed25519_key.pub")
    assert booted.returncode == 0, booted.stdout + booted.stderr
    wanted = ["python3-venv", "sshfs"]
    status = run(cfg, "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' " + " ".join(wanted))
    assert not [line for line in status.stdout.splitlines() if " ii" in line], status.stdout
    assert run(cfg, "command -v sshfs").returncode != 0
    assert run(cfg, "ls /var/lib/apt/lists/ | grep -c _Packages").stdout.strip() == "0"

    # The plan reads the fresh VM and says what configure would do; the VM is left as it was.
    before = plan(cfg)
    assert [r.action for r in before.cloud] == [Action.KEEP] * len(before.cloud), before.cloud
    pending = {r.name: r for r in before.vm}
    assert pending["volume at /mnt/pspace"].reason.startswith("pending: format"), pending
    assert pending["prefect venv"].action == Action.CREATE
    assert pending["canfar auth"].action == Action.CREATE
    packages = pending["packages"]
    assert packages.action == Action.CHANGE
    assert packages.reason.startswith("pending: apt-get install python3-venv sshfs"), packages
    assert not any(r.applied for r in before.vm if r.changed)
    assert run(cfg, f"sudo blkid -p {device}").returncode == 2  # still no filesystem
    assert run(cfg, "findmnt /mnt/pspace || test -e /etc/sails-bootstrap").returncode != 0
    assert run(cfg, "command -v sshfs").returncode != 0  # the plan installed nothing

    lock = run(cfg, f"systemctl is-active {mirror.LOCK_UNIT}").stdout.strip()
    assert lock == "active", "the dpkg lock is no longer held: the test would not show the wait"
    # configure's apt waits on the lock; then unattended-upgrades finishes
    waiting = "pgrep -f 'DPkg::Lock::[T]imeout=[0-9]+ install ' >/dev/null"
    first = released_once_waiting(
        lambda: configure(cfg),
        lambda: run(cfg, waiting).returncode == 0,
        lambda: run(cfg, f"sudo systemctl stop {mirror.LOCK_UNIT}"),
        "configure, for the dpkg lock,",
    )
    records = {r.name: r for r in first.records}
    assert records["packages"].action == Action.CHANGE
    assert records["packages"].reason.startswith("installed python3-venv, sshfs"), records
    assert records["volume at /mnt/pspace"].action == Action.CHANGE  # formatted + mounted
    assert records["prefect venv"].action == Action.CREATE
    assert records["/arc mount"].action == Action.CHANGE

    second = configure(cfg)
    assert [r.name for r in second.records if r.changed] == [], [
        f"{r.name}: {r.reason}" for r in second.records if r.changed
    ]
    assert {r.name: r for r in second.records}["packages"].action == Action.KEEP
    after = plan(cfg)
    assert not [f"{r.name}: {r.reason}" for r in [*after.cloud, *after.vm] if r.changed]
    # The server runs, register has not: the plan reads the server and says what register
    # would do there, doing none of it.
    server = {r.name: r for r in after.server}
    assert server["work pools"].reason.startswith("pending: created "), after.server
    assert server["deployments"].action == Action.CHANGE, after.server
    assert not any(r.applied for r in after.server if r.changed), after.server
    assert plan(cfg).server == after.server  # nothing was made by the first plan
    # what `up` leaves as it is, but an operator should know before anything happens
    assert [n for n in after.notes if n.startswith("backup: no backup in /arc yet")], after.notes

    # The server and the /arc mount run as the service user, whose only root is the units
    # helper: it restarts the environment's own units and nothing else.
    svc, helper = cfg.prefect.user, UNITS_HELPER
    assert svc not in ("root", cfg.server.user)
    owners = run(
        cfg,
        f"pgrep -u {svc} -f 'prefect server start' >/dev/null && pgrep -u {svc} -x sshfs "
        f">/dev/null && echo running; id -nG {svc}; sudo stat -c '%U %a' {cfg.prefect.home} "
        f"/home/{svc}/.ssl/cadcproxy.pem",
    ).stdout.split("\n")
    assert owners[:4] == ["running", svc, f"{svc} 700", f"{svc} 600"], owners
    listed = run(cfg, f"sudo -n sudo -n -l -U {svc}")  # (root lists another user's rules)
    rules = listed.stdout + listed.stderr
    assert "may run the following commands" in rules, rules
    allowed = rules.split("may run the following commands")[1].split("\n")[1:]
    assert [line.strip() for line in allowed if line.strip()] == [f"(root) NOPASSWD: {helper}"], (
        rules
    )
    as_svc = f"sudo -n -u {svc} sudo -n"
    assert run(cfg, f"{as_svc} true").returncode != 0  # no blanket sudo
    refused = run(cfg, f"{as_svc} {helper} restart ssh.service")
    assert refused.returncode == 2 and "not a unit of this environment" in refused.stderr
    assert run(cfg, f"{as_svc} {helper} restart 'prefect-worker@x;id.service'").returncode == 2
    assert run(cfg, f"{as_svc} {helper} reset-failed {UNIT}").returncode == 0
    assert run(cfg, f"{as_svc} {helper} journal prefect-server.service").returncode == 0

    # Drift on the VM: the plan names it and leaves it; configure puts it back.
    bundle = "/etc/sails-bootstrap/ca-bundle.pem"
    run(cfg, f"echo drift | sudo tee -a {bundle} >/dev/null")
    drifted = plan(cfg)
    assert [(r.name, r.action) for r in drifted.vm if r.changed] == [("CA bundle", Action.CHANGE)]
    assert run(cfg, f"sudo tail -n 1 {bundle}").stdout == "drift\n"
    assert [r.name for r in configure(cfg).records if r.changed] == ["CA bundle"]
    assert run(cfg, f"sudo tail -n 1 {bundle}").stdout != "drift\n"

    # The server listens on the VM's loopback only: a plain-HTTP request to the floating IP's
    # port gets no answer, and operators reach it through the alias's SSH forward.
    port = cfg.prefect.port
    listening = run(cfg, f"ss -Htln 'sport = :{port}'").stdout.split()
    assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening, listening
    assert f"*:{port}" not in listening and f"[::]:{port}" not in listening, listening
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{first.address}:{port}/api/health", timeout=5)
    # Through the forward it answers authenticated calls only (its auth string lives in a
    # Secret block).
    auth = server_secrets(cfg)["auth_string"]
    with operator_tunnel(cfg) as url:
        assert api_check(url, None) == 401
        assert api_check(url, auth) == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert auth not in run(cfg, "cat /etc/sails-bootstrap/prefect-server.env 2>&1").stdout

    # Never rotated silently: with the Secret block gone (another machine, a wiped Prefect
    # home), configure reads the server's auth and key back from the VM, and changes nothing.
    from prefect.blocks.system import Secret

    before_secrets = server_secrets(cfg)
    Secret.delete(cfg.prefect.auth_block)
    assert [r.name for r in configure(cfg).records if r.changed] == []
    assert server_secrets(cfg, must_exist=True) == before_secrets
    with operator_tunnel(cfg) as url:
        assert api_check(url, auth) == 200

    # The volume is the one we asked for, the fstab entry is by UUID, the owner is ubuntu
    # (volume.owner); /arc is mounted in the service user's home.
    out = run(
        cfg,
        "findmnt -n -o SOURCE,FSTYPE /mnt/pspace; stat -c %U /mnt/pspace; "
        f"grep /mnt/pspace /etc/fstab; sudo -u {cfg.prefect.user} ls /home/{cfg.prefect.user}"
        "/canfar_arc",
    ).stdout.split()
    assert out[:3] == ["/dev/vdc", "ext4", "ubuntu"]
    assert any(word.startswith("UUID=") for word in out)
    assert "home" in out and "projects" in out

    # What `python3 -m venv` leaves without ensurepip: bin/python and no pip. Data beside it on
    # the volume must survive the repair.
    venv = cfg.prefect.venv
    r = run(
        cfg,
        f"echo keep > /mnt/pspace/operator.txt && rm -rf {venv} && "
        f"python3 -m venv --without-pip {venv} && test -x {venv}/bin/python && "
        f"! {venv}/bin/python -m pip --version",
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    broken = {r.name: r for r in plan(cfg).vm}["prefect venv"]
    assert broken.action == Action.CHANGE
    assert broken.reason.startswith("pending: venv broken"), broken.reason
    assert "rebuild" in broken.reason
    repaired = {r.name: r for r in configure(cfg).records}
    assert repaired["prefect venv"].reason.startswith("rebuilt the broken venv"), repaired
    assert repaired["prefect server"].action == Action.CHANGE  # restarted on the new venv
    r = run(cfg, f"{venv}/bin/python -m pip --version && {venv}/bin/prefect version", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run(cfg, "cat /mnt/pspace/operator.txt").stdout == "keep\n"
    assert [r.name for r in configure(cfg).records if r.changed] == []

    # A reboot from inside brings back the volume, /arc and the Prefect server.
    subprocess.Popen(
        [
            "ssh",
            "-F",
            str(Path(cfg.ssh.config_dir) / "config"),
            cfg.ssh.alias,
            "sudo systemctl reboot",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    wait_ssh(cfg)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = run(
            cfg,
            f"findmnt -n -o SOURCE /mnt/pspace && sudo -u {cfg.prefect.user} "
            f"ls /home/{cfg.prefect.user}/canfar_arc/projects && systemctl is-active prefect-server",
        )
        if r.returncode == 0:
            break
        time.sleep(1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALMA-SAILS" in r.stdout
    with operator_tunnel(cfg) as url:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(1)
        assert api_check(url, auth) == 200


def test_data_survives_teardown_and_reprovision(vm_config) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config("t-data", prefect={"version": None})
    provision(cfg)
    configure(cfg)
    r = run(cfg, "head -c 1M /dev/urandom > /mnt/pspace/keep.bin && sha256sum /mnt/pspace/keep.bin")
    checksum = r.stdout.split()[0]
    teardown(cfg)
    second = provision(cfg)
    assert second.server and second.server.created
    again = configure(cfg)
    volume = next(r for r in again.records if r.name == "volume at /mnt/pspace")
    assert "formatted" not in volume.reason
    assert run(cfg, "sha256sum /mnt/pspace/keep.bin").stdout.split()[0] == checksum

    # The filesystem made there is recorded on the volume: should the volume ever read as empty
    # (a wrong device, a wiped signature), it is not formatted again.
    from tasks.cloud import FS_UUID_KEY, open_connection
    from tasks.cloud.locate import locate_vm

    conn = open_connection(cfg)
    target = locate_vm(conn, cfg)
    assert target.volume_id and target.fs_uuid == volume.id
    device = f"/dev/disk/by-id/virtio-{target.volume_id[:20]}"
    wiped = run(
        cfg,
        f"sudo systemctl stop prefect-server; sudo umount /mnt/pspace && sudo wipefs -a {device}",
    )
    assert wiped.returncode == 0, wiped.stderr
    with pytest.raises(BootstrapError, match=f"filesystem {volume.id}, recorded on the volume"):
        configure(cfg)
    assert run(cfg, f"sudo blkid -p {device}").returncode == 2  # still nothing made there
    metadata = conn.block_storage.get_volume(target.volume_id).metadata
    assert metadata[FS_UUID_KEY] == volume.id


def test_volume_with_another_filesystem_is_refused(vm_config) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config("t-xfs", arc={"enabled": False})
    prov = provision(cfg)
    assert prov.attachment
    by_id = prov.attachment.device_path
    assert (
        run(cfg, f"sudo mkfs.ext2 -q -L precious {by_id} && sudo blkid -p {by_id}").returncode == 0
    )
    before = run(cfg, f"sudo blkid -p -o value -s UUID {by_id}").stdout
    with pytest.raises(BootstrapError, match="holds a ext2 filesystem, not ext4; refusing"):
        configure(cfg)
    assert run(cfg, f"sudo blkid -p -o value -s UUID {by_id}").stdout == before
    assert run(cfg, "findmnt /mnt/pspace").returncode != 0


def test_generated_arc_key_is_published_until_trusted(vm_config, canfar_sandbox) -> None:  # type: ignore[no-untyped-def]
    cfg = vm_config("t-arckey", arc={"key_block": None})
    provision(cfg)
    with pytest.raises(BootstrapError, match="Add the VM's CANFAR public key"):
        configure(cfg)
    svc = cfg.prefect.user
    public = run(cfg, f"sudo cat /home/{svc}/.ssh/canfar_key.pub").stdout.strip()
    assert public.startswith("ssh-rsa ")
    # Untrusted, the unit backs off and gives up at its start limit instead of retrying forever.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        out = run(cfg, "systemctl show -p ActiveState,Result,NRestarts sails-arc.service").stdout
        state = dict(line.split("=", 1) for line in out.split())
        if state.get("ActiveState") == "failed":
            break
        time.sleep(5)
    assert state.get("ActiveState") == "failed", state
    # systemd gave up (its Result stays the last exit's, 'exit-code', on the guests' systemd).
    journal = run(cfg, f"sudo journalctl -u {UNIT} --no-pager -o cat").stdout
    assert "Start request repeated too quickly" in journal, journal[-2000:]
    # ... and stays down: no start within a restart delay and a half (RestartSec=10). (Each
    # daemon-reload by a later step of the same run restarts systemd's start counter, so
    # NRestarts itself may pass the burst before the give-up.)
    time.sleep(15)
    out = run(cfg, "systemctl show -p ActiveState,NRestarts sails-arc.service").stdout
    assert dict(line.split("=", 1) for line in out.split()) == {
        "ActiveState": "failed",
        "NRestarts": state["NRestarts"],
    }, out
    canfar_sandbox.add_arc_key(public)  # what the operator does on CANFAR
    result = configure(cfg)
    assert result.canfar_public_key == public  # generated once, never replaced
    arc = {r.name: r for r in result.records}["/arc mount"]
    assert (arc.action != Action.BLOCKED and "mounted" in arc.reason) or "started" in arc.reason

    # The /arc host's keys pinned in the config: a key that is not the host's is refused by
    # name (and the mount stays down); the host's own keys mount it.
    def pinned(keys: list[str]) -> Any:
        return cfg.model_copy(update={"arc": cfg.arc.model_copy(update={"host_keys": keys})})

    wrong = " ".join(SSHKeyPair.generate().public_key.split()[:2])
    try:
        with pytest.raises(BootstrapError, match=r"not one of arc\.host_keys"):
            configure(pinned([wrong]))
    except pytest.fail.Exception:  # keep what the guest saw: the cause is in its journal
        seen = run(
            cfg,
            f"sudo journalctl -u {UNIT} --no-pager -o short-precise -n 80; "
            "grep sshfs /proc/mounts; pgrep -a sshfs; sudo cat /etc/sails-bootstrap/*known*",
        )
        pytest.fail(f"a wrong pinned /arc host key was not refused; on the VM:\n{seen.stdout}")
    mounted = (
        f"sudo -u {svc} sh -c 'mountpoint -q ~/canfar_arc && timeout 10 ls ~/canfar_arc "
        ">/dev/null' && echo yes"
    )
    assert run(cfg, mounted).stdout.strip() != "yes"
    result = configure(pinned(canfar_sandbox.info()["arc_host_keys"]))
    arc = {r.name: r for r in result.records}["/arc mount"]
    assert arc.action == Action.CHANGE and "pinned the /arc host keys" in arc.reason, arc
    assert run(cfg, mounted).stdout.strip() == "yes"
    assert "StrictHostKeyChecking=yes" in run(cfg, f"cat /etc/systemd/system/{UNIT}").stdout
