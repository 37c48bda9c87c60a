"""The provision and teardown flows against the sandbox cloud (real OpenStack services)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blocks.ssh import SSHKeyPair, fingerprint
from core.config import dump_config
from core.errors import PreflightError
from core.records import Action
from flows.provision import provision
from flows.teardown import teardown
from sails_bootstrap.cli import NO_DATABASE
from tasks.local_ssh import MANAGED_FILE, host_matches, key_file
from tests.fixtures.bootstrap import kill_cli, ssh_alias, start_cli
from tests.fixtures.cloud import ours, resource_writes

pytestmark = [pytest.mark.sandbox]


@pytest.fixture
def env_config(make_config, prefect_server, sandbox_env, admin_conn):  # type: ignore[no-untyped-def]
    configs = []

    def make(name: str, **sections: Any):  # type: ignore[no-untyped-def]
        cfg = make_config(name, **sections)
        configs.append(cfg)
        return cfg

    yield make
    for cfg in configs:  # leave nothing behind, whatever the test did
        with contextlib.suppress(Exception):
            teardown(cfg, delete_data_volume=True)
        import openstack

        user = openstack.connect(cloud=os.environ["OS_CLOUD"])  # keypairs belong to the user
        user.compute.delete_keypair(cfg.keypair_name, ignore_missing=True)


def test_plan_then_provision_then_noop(env_config, fault_control, admin_conn) -> None:  # type: ignore[no-untyped-def]
    cfg = env_config("t-fresh")
    fault_control.reset()
    plan = provision(cfg, plan=True)
    assert resource_writes(fault_control) == []
    actions = {r.kind: r.action for r in plan.records}
    assert actions["server"] == Action.CREATE and actions["volume"] == Action.CREATE
    assert actions["keypair"] == Action.CREATE

    first = provision(cfg)
    assert first.server and first.server.status == "ACTIVE" and first.server.created
    assert first.address and first.address.startswith("172.24.4.")
    assert first.attachment and first.attachment.device_path == (
        f"/dev/disk/by-id/virtio-{first.attachment.volume_id[:20]}"
    )
    assert first.console_fingerprints, "the console shows the host key fingerprints"
    assert first.local_ssh and first.local_ssh.host_key_check == "console"
    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1]

    fault_control.reset()
    second = provision(cfg)
    assert resource_writes(fault_control) == []
    assert all(r.action == Action.KEEP for r in second.records), second.table()
    after = provision(cfg, plan=True)
    assert all(r.action == Action.KEEP for r in after.records)

    # `ssh <alias>` works with the managed config (the user's config only gained an Include).
    ssh_dir = Path(cfg.ssh.config_dir)
    assert (ssh_dir / "config").read_text().startswith(f"Include {ssh_dir / MANAGED_FILE}")
    assert oct(key_file(cfg).stat().st_mode & 0o777) == "0o600"
    out = ssh_alias(cfg, "cat /proc/1/comm; whoami", "StrictHostKeyChecking=yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["systemd", "ubuntu"]


def test_bad_input_makes_no_writes(env_config, fault_control) -> None:  # type: ignore[no-untyped-def]
    cases = [
        ({"server": {"image": "Ubuntu-99.04"}}, "image 'Ubuntu-99.04' not found"),
        ({"server": {"flavor": "c9-huge"}}, "flavor 'c9-huge' not found"),
        ({"volume": {"size_gb": 500}}, "quota: the volume needs 500 GB"),
        ({"server": {"network": "no-such-net"}}, "project network 'no-such-net' not found"),
    ]
    for i, (sections, message) in enumerate(cases):
        cfg = env_config(f"t-bad-{i}", **sections)
        fault_control.reset()
        with pytest.raises(PreflightError, match=message):
            provision(cfg)
        assert resource_writes(fault_control) == [], (sections, fault_control.counts())


def test_wrong_credentials_and_mismatched_key(
    env_config, fault_control, tmp_path, monkeypatch, admin_conn
) -> None:  # type: ignore[no-untyped-def]
    cfg = env_config("t-key")
    # A keypair of that name already holds another key: an error naming both fingerprints.
    other = SSHKeyPair.generate()
    admin_conn  # noqa: B018 - the project user's connection creates it, as an operator would
    import openstack

    user = openstack.connect(cloud=os.environ["OS_CLOUD"])
    user.compute.create_keypair(name=cfg.keypair_name, public_key=other.public_key)
    mine = SSHKeyPair.generate()
    mine.save(cfg.ssh.key_block, overwrite=True)
    fault_control.reset()
    with pytest.raises(PreflightError) as info:
        provision(cfg)
    assert fingerprint(other.public_key) in str(info.value)
    assert mine.fingerprint in str(info.value)
    assert resource_writes(fault_control) == []

    # Credentials the cloud refuses: clear error, no writes, and the secret is not in it.
    clouds = Path(os.environ["OS_CLIENT_CONFIG_FILE"]).read_text()
    import yaml

    data = yaml.safe_load(clouds)
    entry = data["clouds"][os.environ["OS_CLOUD"]]
    secret_key = (
        "application_credential_secret"
        if "application_credential_secret" in entry["auth"]
        else "password"
    )
    entry["auth"][secret_key] = "wrong-secret-0b1c"
    bad = tmp_path / "clouds.yaml"
    bad.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(bad))
    fault_control.reset()
    with pytest.raises(PreflightError, match="refused the credentials") as info:
        provision(cfg)
    assert "wrong-secret-0b1c" not in str(info.value)
    assert resource_writes(fault_control) == []


def test_teardown_then_reprovision_keeps_the_volume(
    env_config, admin_conn, prefect_server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    cfg = env_config("t-recreate")
    first = provision(cfg)
    assert first.attachment and first.address
    kh = Path(cfg.ssh.config_dir) / "known_hosts"
    old_keys = set(first.local_ssh.host_keys) if first.local_ssh else set()

    removed = teardown(cfg)
    kinds = sorted(r.kind for r in removed)
    assert kinds == ["floating ip", "security group", "server"]
    world = ours(admin_conn, cfg)
    assert world["servers"] == [] and world["fips"] == []
    assert [v.id for v in world["volumes"]] == [first.attachment.volume_id]
    assert teardown(cfg) == []  # idempotent

    second = provision(cfg)
    assert second.server and second.server.created and second.server.id != first.server.id
    assert second.attachment and second.attachment.volume_id == first.attachment.volume_id
    new_keys = set(second.local_ssh.host_keys) if second.local_ssh else set()
    assert new_keys and new_keys.isdisjoint(old_keys)
    entries = [line.split() for line in kh.read_text().splitlines() if line.strip()]
    for_address = [e for e in entries if host_matches(e[0], second.address or "")]
    assert for_address and {fingerprint(f"{e[1]} {e[2]}") for e in for_address} <= new_keys

    # `down --delete-volume` deletes the data only by the volume's id: not the flag alone, not
    # a mistyped id.
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    down = ["down", "--config", str(cfg_file), "--yes", "--delete-volume"]
    volume_id = first.attachment.volume_id
    for extra, said in (([], "needs --volume-id"), (["--volume-id", "0000"], "is not the id")):
        proc = start_cli(*down, *extra, env=prefect_server.env(), logs=True)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and said in err.decode(), err.decode()
        assert [v.id for v in ours(admin_conn, cfg)["volumes"]] == [volume_id]
    assert ours(admin_conn, cfg)["servers"]  # refused before anything was deleted
    # the database is copied off first; this VM was never configured: nothing to copy
    proc = subprocess.run(
        [sys.executable, "-m", "sails_bootstrap.cli", *down, "--volume-id", volume_id],
        env={**os.environ, **prefect_server.env()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"backup: {NO_DATABASE}" in proc.stdout, proc.stdout
    assert ours(admin_conn, cfg) == {"servers": [], "fips": [], "volumes": []}


def test_teardown_returns_when_the_volume_is_gone(env_config, admin_conn, user_conn) -> None:  # type: ignore[no-untyped-def]
    """Cinder deletes in the background; teardown is done only when the volume is gone, also
    when it meets a volume that an interrupted run had begun deleting."""
    from sandbox import latency
    from tasks.cloud import MARKER

    cfg = env_config("t-slowdelete")

    def our_volume() -> Any:
        vol = user_conn.block_storage.create_volume(
            name=cfg.volume_name, size=1, metadata={MARKER: cfg.environment}
        )
        return user_conn.block_storage.wait_for_status(vol, "available", interval=1, wait=60)

    latency.set_latency(volume_delete=8)
    try:
        vol = our_volume()
        removed = teardown(cfg, delete_data_volume=True)
        assert [(r.kind, r.id) for r in removed] == [("volume", vol.id)]
        assert ours(admin_conn, cfg)["volumes"] == []

        # Long enough that the volume is still `deleting` after the plan below and the
        # teardown's server, address and group steps (about 20 s on a busy 2-core machine).
        latency.set_latency(volume_delete=35)
        vol = our_volume()
        user_conn.block_storage.delete_volume(vol.id)  # a run killed right after this call
        assert user_conn.block_storage.get_volume(vol.id).status == "deleting"
        plan = provision(cfg, plan=True)  # a volume on its way out is not the data volume
        assert {r.kind: r.action for r in plan.records}["volume"] == Action.CREATE
        removed = teardown(cfg, delete_data_volume=True)
        assert [(r.id, r.reason) for r in removed] == [(vol.id, "already being deleted")]
        assert ours(admin_conn, cfg)["volumes"] == []
    finally:
        latency.set_latency()


def test_a_second_volume_of_ours_is_never_deleted(
    env_config, admin_conn, user_conn, fault_control
) -> None:  # type: ignore[no-untyped-def]
    """Two volumes of one environment (a run from another machine, a hand-made copy): either
    may hold the data. The plan names both as cannot-proceed, a run refuses before any write,
    and both are still there."""
    from tasks.cloud import MARKER

    cfg = env_config("t-twovols")
    made = [
        user_conn.block_storage.create_volume(
            name=cfg.volume_name, size=1, metadata={MARKER: cfg.environment}
        )
        for _ in range(2)
    ]
    try:
        for vol in made:
            user_conn.block_storage.wait_for_status(vol, "available", interval=1, wait=60)
        SSHKeyPair.generate().save(cfg.ssh.key_block, overwrite=True)
        fault_control.reset()
        plan = provision(cfg, plan=True)
        rows = [r for r in plan.records if r.action == Action.BLOCKED]
        assert rows and all(v.id in rows[0].reason for v in made), plan.records
        with pytest.raises(PreflightError) as info:
            provision(cfg)
        assert "never deleted for you" in str(info.value)
        assert all(v.id in str(info.value) for v in made)
        assert resource_writes(fault_control) == []
        assert sorted(v.id for v in ours(admin_conn, cfg)["volumes"]) == sorted(v.id for v in made)
    finally:
        for vol in made:
            user_conn.block_storage.delete_volume(vol.id, ignore_missing=True)


def _paths(fault_control: Any) -> list[str]:
    return [key for per_service in fault_control.counts()["paths"].values() for key in per_service]


def seen_request(fault_control: Any, method: str, suffix: str) -> bool:
    paths = fault_control.counts()["paths"]
    return any(
        key.split(" ", 1)[0] == method and key.split(" ", 1)[1].endswith(suffix)
        for per_service in paths.values()
        for key in per_service
    )


STEP_MARKERS = [
    ("POST", "/servers"),  # the server was just requested
    ("POST", "/floatingips"),  # an address allocated, not yet attached
    ("POST", "/os-volume_attachments"),  # the attach was just requested
]


@pytest.mark.parametrize("marker", STEP_MARKERS, ids=[m[1].strip("/") for m in STEP_MARKERS])
def test_killed_run_converges(
    env_config, fault_control, admin_conn, prefect_server, marker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Kill the flow process right after a write, run again: no duplicates, nothing leaked."""
    cfg = env_config(f"t-kill-{STEP_MARKERS.index(marker)}")
    SSHKeyPair.generate().save(cfg.ssh.key_block, overwrite=True)
    cfg_file = tmp_path / "config.yaml"
    from core.config import dump_config

    cfg_file.write_text(dump_config(cfg))
    fault_control.reset()
    proc = start_cli("provision", "--config", str(cfg_file), env=prefect_server.env())
    method, suffix = marker
    deadline = time.monotonic() + 240
    seen = False
    while time.monotonic() < deadline and proc.poll() is None:
        if seen_request(fault_control, method, suffix):
            seen = True
            break
        time.sleep(0.05)
    kill_cli(proc)
    assert seen, f"the run never reached {marker}"

    result = provision(cfg)
    assert result.server and result.server.status == "ACTIVE"
    world = ours(admin_conn, cfg)
    assert len(world["servers"]) == 1, world["servers"]
    assert len(world["fips"]) == 1 and world["fips"][0].port_id
    assert len(world["volumes"]) == 1 and world["volumes"][0].status == "in-use"


def test_two_runs_started_together_make_one_of_each(
    env_config, admin_conn, prefect_server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Two `provision` runs of one environment started at once: the second waits for the first
    (saying so) and then changes nothing; one server, one floating IP, one volume."""
    cfg = env_config("t-twice")
    SSHKeyPair.generate().save(cfg.ssh.key_block, overwrite=True)
    cfg_file = tmp_path / "config.yaml"
    from core.config import dump_config

    cfg_file.write_text(dump_config(cfg))
    env = {**prefect_server.env(), "XDG_STATE_HOME": str(tmp_path / "state")}
    runs = [start_cli("provision", "--config", str(cfg_file), env=env, logs=True) for _ in range(2)]
    said = [run.communicate(timeout=600)[1].decode(errors="replace") for run in runs]
    assert [run.returncode for run in runs] == [0, 0], said
    assert sum("waiting for another run of 't-twice' to end" in out for out in said) == 1, said
    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1], world


# -- preflight: images, quota and credentials as a real project has them -------------------------
@pytest.fixture
def private_images(user_conn):  # type: ignore[no-untyped-def]
    """Images the project itself uploads (queued, no data: enough to be listed and found)."""
    made: list[Any] = []

    def make(name: str, **props: Any) -> Any:
        image = user_conn.image.create_image(
            name=name, disk_format="raw", container_format="bare", visibility="private", **props
        )
        made.append(image)
        return image

    yield make
    for image in made:
        user_conn.image.delete_image(image, ignore_missing=True)


def test_two_images_with_one_name_and_a_missing_one(
    env_config, fault_control, private_images
) -> None:  # type: ignore[no-untyped-def]
    import secrets

    name = f"Ubuntu-24.04-Noble-x64-t{secrets.token_hex(3)}"
    first, second = private_images(name), private_images(name)
    cfg = env_config("t-dupimage", server={"image": name})
    fault_control.reset()
    with pytest.raises(PreflightError) as info:
        provision(cfg)
    message = str(info.value)
    assert f"2 images are named {name!r}" in message
    assert first.id in message and second.id in message and "server.image" in message
    assert fault_control.writes(user_agent="sails-bootstrap/t-dupimage") == 0

    # Named by id instead, the image is no problem (it is queued: said so, not a duplicate).
    by_id = provision(env_config("t-byid", server={"image": first.id}), plan=True)
    reasons = [r.reason for r in by_id.records if r.kind == "preflight"]
    assert reasons == [
        f"image {first.id!r} ({first.id}) is queued, not active; choose another in server.image"
    ]

    # Missing: the hint names the project's Ubuntu images, not the first names alphabetically.
    with pytest.raises(PreflightError) as info:
        provision(env_config("t-noimage", server={"image": "Ubuntu-99.04"}))
    assert "similar: " in str(info.value) and "Ubuntu-24.04-Noble-x64-2024-06" in str(info.value)


@pytest.fixture
def tight_project(admin_conn, sandbox_env, tmp_path):  # type: ignore[no-untyped-def]
    """A second project as small allocations are: its one floating IP already held (by the
    hand-made VM), no room for another volume or for more security-group rules. Yields the
    path of a clouds.yaml whose entry ``tight`` is scoped to it by project_id, as the
    dashboard's clouds.yaml is, with no password in it."""
    import secrets

    import yaml

    from sandbox import layout

    ident, net = admin_conn.identity, admin_conn.network
    clouds = yaml.safe_load(layout.clouds_yaml().read_text())["clouds"]
    entry = clouds[f"{layout.CLOUD_NAME}-password"]
    project = ident.create_project(name=f"t-tight-{secrets.token_hex(3)}", domain_id="default")
    try:
        user = ident.find_user(entry["auth"]["username"], domain_id="default")
        ident.assign_project_role_to_user(project, user, ident.find_role("member"))
        network = net.create_network(name="t-tight-net", project_id=project.id)
        net.create_subnet(
            network_id=network.id, project_id=project.id, ip_version=4, cidr="10.231.0.0/24"
        )
        public = net.find_network("public")
        net.create_ip(
            floating_network_id=public.id, project_id=project.id, description="hand-made VM"
        )
        auth = {k: v for k, v in entry["auth"].items() if k not in ("project_name", "password")}
        auth["project_id"] = project.id
        tight = {**entry, "auth": auth}
        path = tmp_path / "clouds.yaml"
        path.write_text(yaml.safe_dump({"clouds": {"tight": tight}}))
        # The project's default group (with its default rules) exists once the project looks.
        scoped = openstack_connect(tight, entry["auth"]["password"])
        list(scoped.network.security_groups(project_id=project.id))
        used = net.get_quota(project.id, details=True).security_group_rules["used"]
        admin_conn.set_network_quotas(project.id, floatingip=1, security_group_rule=used)
        admin_conn.set_volume_quotas(project.id, volumes=0)
        yield path, project, entry["auth"]["password"]
    finally:
        for fip in net.ips(project_id=project.id):
            net.delete_ip(fip, ignore_missing=True)
        for port in net.ports(project_id=project.id):
            if port.device_owner != "network:dhcp":
                net.delete_port(port, ignore_missing=True)
        for network in net.networks(project_id=project.id):
            net.delete_network(network, ignore_missing=True)
        for group in net.security_groups(project_id=project.id):
            net.delete_security_group(group, ignore_missing=True)
        ident.delete_project(project, ignore_missing=True)


def openstack_connect(entry: dict[str, Any], password: str) -> Any:
    import openstack

    return openstack.connect(
        auth_type=entry.get("auth_type", "password"),
        auth={**entry["auth"], "password": password},
        region_name=entry.get("region_name"),
        interface=entry.get("interface", "public"),
        cacert=entry.get("cacert"),  # the sandbox CA: its endpoints speak HTTPS only
        load_yaml_config=False,
        load_envvars=False,
    )


def test_preflight_sees_the_projects_quota_and_scopes_by_id(
    make_config, prefect_server, tight_project, fault_control, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from core.errors import BootstrapError

    clouds, _project, password = tight_project
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    monkeypatch.delenv("OS_PASSWORD", raising=False)
    cfg = make_config("t-tight", cloud={"cloud": "tight"})
    SSHKeyPair.generate().save(cfg.ssh.key_block, overwrite=True)

    # The dashboard's password clouds.yaml has no password: said before any cloud request.
    fault_control.reset()
    with pytest.raises(BootstrapError, match="OS_PASSWORD") as info:
        provision(cfg)
    assert "application credential" in str(info.value)
    assert "sails-bootstrap/t-tight" not in fault_control.counts()["agents"]  # no request made

    # With OS_PASSWORD, scoped to the project by its id; every full quota is named, with its fix.
    monkeypatch.setenv("OS_PASSWORD", password)
    fault_control.reset()
    with pytest.raises(PreflightError) as info:
        provision(cfg)
    problems = info.value.problems
    assert fault_control.writes(user_agent="sails-bootstrap/t-tight") == 0
    assert not any("network" in p and "not found" in p for p in problems), problems
    joined = "\n".join(problems)
    assert "Neutron quota 'floatingip'" in joined and "uses 1 of 1" in joined, problems
    assert "openstack floating ip delete" in joined
    # the two ingress rules of the seed (ICMP, SSH) and the two egress rules a new group gets
    assert "would add 4 security_group_rule" in joined and "'security_group_rule'" in joined
    assert "Cinder quota 'volumes'" in joined and "0 of 0 volumes" in joined
    assert len(problems) == 3, problems


def test_preflight_of_a_run_that_changes_nothing_reads_no_quota(
    env_config, fault_control, user_conn
) -> None:  # type: ignore[no-untyped-def]
    """A no-op run's preflight: one read chain per service, no quota. Its requests are told
    apart from anyone else's on the shared proxy by the connection's own User-Agent."""
    import openstack

    from tasks.cloud.preflight import preflight

    cfg = env_config("t-noopquota")
    made = provision(cfg, local_ssh=False)  # the server, address and volume, no SSH wait
    assert made.address and made.attachment and made.attachment.id
    key = SSHKeyPair.load(cfg.ssh.key_block)
    agent = f"t-preflight-{os.getpid()}"
    conn = openstack.connect(cloud=os.environ["OS_CLOUD"], app_name=agent)
    before = fault_control.counts()["agents"].get(agent, {})
    facts = preflight(conn, cfg, key)
    assert facts.image_id and facts.security_group_id
    seen = fault_control.counts()["agents"].get(agent, {})
    assert not before
    reads = sorted(f"{svc} {p}" for svc, paths in seen.items() for p in paths)
    assert not any("/limits" in r or "/quotas" in r for r in reads), reads
    assert not any(
        r.split(" ")[1] in ("POST", "PUT", "PATCH", "DELETE")
        for r in reads
        if "/auth/tokens" not in r
    ), reads
    total = sum(sum(paths.values()) for paths in seen.values())
    print(f"no-op preflight: {total} requests: {reads}")
    assert total <= 16, reads


def test_application_credential_block_opens_the_project(
    prefect_server, sandbox_env, user_conn
) -> None:  # type: ignore[no-untyped-def]
    """The seed's clouds.yaml entry is an application credential, as the dashboard makes one:
    kept as a block, it opens the project (scoped by Keystone, no project named)."""
    from blocks.openstack import OpenStackCredentials
    from core.config import parse_config
    from core.settings import SEED_IMAGE
    from tasks.cloud import open_connection

    creds = OpenStackCredentials.from_clouds_yaml(os.environ["OS_CLOUD"])
    assert creds.auth_type == "v3applicationcredential" and creds.password is None
    assert creds.application_credential_secret is not None
    creds.save("t-appcred", overwrite=True)
    cfg = parse_config({"environment": "t-appcred", "cloud": {"credentials_block": "t-appcred"}})
    conn = open_connection(cfg)
    assert "project_id" not in conn.config.get_auth_args()
    assert conn.current_project_id == user_conn.current_project_id
    image = conn.image.find_image(SEED_IMAGE)
    assert image is not None and image.status == "active"


def test_provision_waits_out_a_late_sshd(env_config) -> None:  # type: ignore[no-untyped-def]
    """ACTIVE comes when the guest starts; its sshd answers half a minute later (a real cloud's
    first boot). Provisioning waits for it, verifies the host keys on the console and leaves
    `ssh <alias>` working, without failing on the refused or unanswered connections before."""
    from sandbox import latency

    cfg = env_config("t-latesshd", server={"flavor": "p1-1.5gb"})
    saved = {k: latency.get(k) for k in ("boot", "volume_create", "volume_delete")}
    latency.set_latency(**{k: v for k, v in saved.items() if v}, sshd_delay=30)
    try:
        result = provision(cfg)
    finally:
        latency.set_latency(**{k: v for k, v in saved.items() if v})
    assert result.local_ssh and result.local_ssh.host_key_check == "console", result.local_ssh
    r = ssh_alias(cfg, "systemctl cat ssh.service | grep -c 'sleep 30'; cloud-init status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[0] == "1"  # the late sshd was in force on this guest
    assert "done" in r.stdout


def test_the_vm_gets_an_application_credential_never_a_password(
    prefect_server, sandbox_env, user_conn
) -> None:  # type: ignore[no-untyped-def]
    """Password credentials hand the VM an application credential of their own user: made once,
    reused while it exists, replaced when its secret is lost, revoked with the VM."""
    from blocks.openstack import OpenStackCredentials

    password = OpenStackCredentials.from_clouds_yaml("sandbox-password")
    name = "sails-t-appcred-vm"
    try:
        first, made = password.delegated(name, None, "t-appcred")
        assert made and first.auth_type == "v3applicationcredential" and first.password is None
        assert first.username is None and first.application_credential_secret is not None
        conn = first.get_connection("t-appcred")
        assert conn.current_project_id == user_conn.current_project_id  # it opens the project
        conn.close()
        again, made = password.delegated(name, first, "t-appcred")
        assert not made and again.application_credential_id == first.application_credential_id
        lost, made = password.delegated(name, None, "t-appcred")  # its secret is gone here
        assert made and lost.application_credential_id != first.application_credential_id
        # An application credential is handed on as it is (it cannot make others).
        assert lost.delegated(name, None, "t-appcred") == (lost, False)
        assert password.revoke_delegated(name, "t-appcred")
        assert not password.revoke_delegated(name, "t-appcred")
    finally:
        password.revoke_delegated(name, "t-appcred")
