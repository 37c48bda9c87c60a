# ruff: noqa: F811  (pytest fixtures imported from tests.fixtures.cloud)
"""The sandbox cloud driven the way the product drives a real one: openstacksdk's cloud layer.

With the guests library present, a server is a systemd guest reachable over SSH on its floating
IP and a volume is a block device inside it; without it the checks stay at the API level.
"""

from __future__ import annotations

import importlib.util
import io
import socket
import subprocess
import time
import uuid

import pytest

from tests.fixtures.cloud import (  # noqa: F401  (fixtures)
    admin_conn,
    fault_control,
    sandbox_cloud,
    user_conn,
)

pytestmark = pytest.mark.sandbox

IMAGE = "Ubuntu-24.04-Noble-x64-2024-06"
FLAVOR = "c1-7.5gb-36"
NETWORK = "alma-sails-network"
GUESTS = importlib.util.find_spec("sandbox.guests") is not None


def make_key():
    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return public, paramiko.Ed25519Key.from_private_key(io.StringIO(private))


def ssh(host: str, pkey, timeout: float = 90.0):
    import paramiko

    deadline = time.monotonic() + timeout
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                host,
                username="ubuntu",
                pkey=pkey,
                timeout=5,
                banner_timeout=5,
                auth_timeout=5,
                allow_agent=False,
                look_for_keys=False,
            )
            return client
        except (OSError, paramiko.SSHException):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def run(client, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=60)
    rc = stdout.channel.recv_exit_status()
    out = stdout.read().decode()
    assert rc == 0, f"{command!r} -> rc={rc}: {out} {stderr.read().decode()}"
    return out


def test_clouds_yaml_entries(sandbox_cloud, user_conn, admin_conn):
    from tests.fixtures.cloud import connect

    assert sandbox_cloud["OS_CLOUD"] == "sandbox"
    assert user_conn.config.config["auth_type"] == "v3applicationcredential"
    project = user_conn.current_project_id
    pw = connect("sandbox-password")
    assert pw.current_project_id == project
    assert admin_conn.identity.get_project(project).name == "alma-sails"
    # the catalog a client sees points at the fault proxy, on the tenant gateway (where the
    # guests reach it too)
    assert user_conn.compute.get_endpoint().startswith("https://10.211.0.1:8774")
    catalog = user_conn.session.auth.get_access(user_conn.session).service_catalog.catalog
    public = [e["url"] for s in catalog for e in s["endpoints"] if e["interface"] == "public"]
    assert public and all(u.startswith("https://10.211.0.1:") for u in public), public
    limits = user_conn.get_compute_limits()
    assert (limits.max_total_instances, limits.max_total_cores) == (4, 4)
    assert limits.max_total_ram_size == 16384
    flavor = user_conn.get_flavor(FLAVOR)
    assert (flavor.vcpus, flavor.ram, flavor.disk, flavor.ephemeral) == (1, 7680, 20, 36)
    assert user_conn.get_image(IMAGE) is not None


def test_public_endpoints_speak_tls_only(sandbox_cloud):
    """As on a real cloud: the public endpoints answer HTTPS with a certificate that verifies
    against the CA clouds.yaml names, a client without that CA refuses them, and a plain-HTTP
    request gets no HTTP answer."""
    import ssl
    import urllib.error
    import urllib.request

    import yaml

    from sandbox.cloud import common

    with open(sandbox_cloud["OS_CLIENT_CONFIG_FILE"]) as fh:
        entry = yaml.safe_load(fh)["clouds"]["sandbox"]
    trusting = ssl.create_default_context(cafile=entry["cacert"])
    with urllib.request.urlopen(common.AUTH_URL, timeout=10, context=trusting) as resp:
        links = resp.read().decode()
    assert resp.status == 200 and common.AUTH_URL in links  # its links name https too
    system_only = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(common.AUTH_URL, timeout=10, context=system_only)
    with socket.create_connection((common.PUBLIC_HOST, 5000), timeout=10) as sock:
        sock.sendall(b"GET /v3 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    # and the sandbox's own liveness check speaks HTTPS too: a running cloud is not started
    # and seeded again by every test's `manager.up()`
    from sandbox import manager

    assert manager.cloud_running()


def test_server_life_cycle(user_conn):
    conn = user_conn
    tag = uuid.uuid4().hex[:6]
    public, pkey = make_key()
    conn.create_keypair(f"k-{tag}", public_key=public)
    sg = conn.create_security_group(f"sg-{tag}", "test")
    conn.create_security_group_rule(sg.id, 22, 22, "tcp", remote_ip_prefix="0.0.0.0/0")
    import openstack

    with pytest.raises(openstack.exceptions.ConflictException):
        conn.create_security_group_rule(sg.id, 22, 22, "tcp", remote_ip_prefix="0.0.0.0/0")

    server = volume = None
    try:
        server = conn.create_server(
            f"vm-{tag}",
            image=IMAGE,
            flavor=FLAVOR,
            network=NETWORK,
            key_name=f"k-{tag}",
            security_groups=[sg.name],
            auto_ip=False,
            userdata="#cloud-config\nruncmd:\n  - [sh, -c, 'echo ran > /var/tmp/user-data']\n",
            wait=True,
            timeout=180,
        )
        assert server.status == "ACTIVE"
        fip = conn.create_floating_ip(network="public", server=server, wait=True, timeout=60)
        address = fip.floating_ip_address
        deadline = time.monotonic() + 30
        while conn.network.get_ip(fip.id).status != "ACTIVE":
            assert time.monotonic() < deadline, "floating IP never became ACTIVE"
            time.sleep(0.5)
        assert conn.get_server(server.id).public_v4 == address

        volume = conn.create_volume(1, name=f"vol-{tag}", wait=True, timeout=120)
        conn.attach_volume(server, volume, wait=True, timeout=120)
        assert conn.get_volume_attach_device(conn.get_volume(volume.id), server.id) == "/dev/vdc"

        assert conn.get_server_console(server)
        if GUESTS:
            # ACTIVE is early: sshd answers, and cloud-init prints the host key fingerprints on
            # the console, once the guest's own first boot gets there
            client = ssh(address, pkey)
            try:
                deadline = time.monotonic() + 90
                while "-----BEGIN SSH HOST KEY FINGERPRINTS-----" not in (
                    conn.get_server_console(server) or ""
                ):
                    assert time.monotonic() < deadline, "no host key fingerprints on the console"
                    time.sleep(1)
                assert run(client, "cat /proc/1/comm").strip() == "systemd"
                # cloud-init's first boot read nova's own metadata (the config drive tree)
                assert run(client, "cat /var/lib/cloud/data/instance-id").strip() == server.id
                assert run(client, "cloud-init status").split() == ["status:", "done"]
                assert run(client, "cat /var/tmp/user-data").strip() == "ran"
                # cloud-init mounted the flavor's ephemeral disk (nova's ephemeral0 mapping)
                assert run(client, "findmnt -n -o SOURCE /mnt").strip() == "/dev/vdb"
                # the flavor's 36 GB ephemeral disk comes before the first volume, as on Arbutus
                assert run(client, "sudo blockdev --getsize64 /dev/vdb").strip() == str(36 << 30)
                by_id = f"/dev/disk/by-id/virtio-{volume.id[:20]}"
                run(client, f"test -b {by_id}")
                run(client, f"sudo mkfs.ext4 -q {by_id} && sudo mkdir -p /mnt/v")
                run(client, f"sudo mount {by_id} /mnt/v && echo hello | sudo tee /mnt/v/f")
                run(client, "sudo umount /mnt/v")
                client.exec_command("sudo reboot")
            finally:
                client.close()
            time.sleep(2)
            client = ssh(address, pkey, timeout=120)
            try:
                run(client, f"test -b {by_id}")
                run(client, f"sudo mount {by_id} /mnt/v && grep -q hello /mnt/v/f")
                run(client, "sudo umount /mnt/v")
            finally:
                client.close()

        conn.detach_volume(server, volume, wait=True, timeout=120)
        assert conn.get_volume(volume.id).status == "available"
        assert conn.delete_server(server.id, wait=True, timeout=120)
        server = None
        deadline = time.monotonic() + 30
        while conn.network.get_ip(fip.id).status != "DOWN":
            assert time.monotonic() < deadline, "floating IP stayed ACTIVE"
            time.sleep(0.5)
        with socket.socket() as s:  # an unassociated floating address fails at once
            s.settimeout(5)
            assert s.connect_ex((address, 22)) != 0
        conn.delete_floating_ip(fip.id)
        assert conn.delete_volume(volume.id, wait=True, timeout=120)
        volume = None
    finally:
        if server is not None:
            conn.delete_server(server.id, wait=True, delete_ips=True, timeout=120)
        if volume is not None:
            conn.delete_volume(volume.id, wait=True, timeout=120)
        conn.delete_security_group(sg.id)
        conn.delete_keypair(f"k-{tag}")


@pytest.mark.skipif(not GUESTS, reason="needs sandbox.guests")
def test_power_off_from_inside_and_api_start_stop(user_conn):
    conn = user_conn
    tag = uuid.uuid4().hex[:6]
    public, pkey = make_key()
    conn.create_keypair(f"k-{tag}", public_key=public)
    # security groups are enforced: the project's default group admits only its own members
    sg = conn.create_security_group(f"sg-{tag}", "ssh")
    conn.create_security_group_rule(sg.id, 22, 22, "tcp", remote_ip_prefix="0.0.0.0/0")
    server = None
    try:
        server = conn.create_server(
            f"pw-{tag}",
            image=IMAGE,
            flavor="p1-1.5gb",
            network=NETWORK,
            key_name=f"k-{tag}",
            security_groups=[sg.name],
            auto_ip=False,
            wait=True,
            timeout=180,
        )
        fip = conn.create_floating_ip(network="public", server=server, wait=True, timeout=60)
        address = fip.floating_ip_address
        client = ssh(address, pkey)
        client.exec_command("sudo poweroff")
        client.close()
        # nova's power-state sync sees the guest gone and records the server as stopped
        conn.compute.wait_for_server(
            conn.compute.get_server(server.id), status="SHUTOFF", wait=90, interval=1
        )
        conn.compute.start_server(server.id)
        conn.compute.wait_for_server(
            conn.compute.get_server(server.id), status="ACTIVE", wait=120, interval=1
        )
        client = ssh(address, pkey)
        try:
            assert run(client, "cat /proc/1/comm").strip() == "systemd"
        finally:
            client.close()
        conn.compute.stop_server(server.id)
        conn.compute.wait_for_server(
            conn.compute.get_server(server.id), status="SHUTOFF", wait=120, interval=1
        )
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((address, 22)) != 0
    finally:
        if server is not None:
            conn.delete_server(server.id, wait=True, delete_ips=True, timeout=120)
        conn.delete_security_group(sg.id)
        conn.delete_keypair(f"k-{tag}")


def _sandbox_leftovers() -> list[str]:
    from sandbox import layout
    from sandbox.cloud import common, procs, services

    found = [f"process {n}" for n in services.ALL_PROCS if procs.running(n)]
    state = str(layout.STATE_DIR)
    marks = [state, str(common.VENV), "sandbox.guests", *(f"sails-{n}" for n in services.APIS)]
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        stat, _, args = line.strip().partition(" ")
        if not stat.startswith("Z") and any(m in args for m in marks):
            found.append(f"process {args[:80]}")
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {ln}" for ln in losetup.splitlines() if state in ln]
    with open("/proc/mounts") as fh:
        found += [f"mount {ln}" for ln in fh if state in ln.split()[1]]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if GUESTS:
        from sandbox import guests

        # stopped guests keep their records (disks stay, as a VM's would); none may run
        found += [f"guest {g}" for g in guests.list_guests() if guests.power_state(g) == "running"]
        found += [f"netns {ln}" for ln in netns.splitlines() if ln.strip()]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {layout.TENANT_BRIDGE}" for _ in [0] if layout.TENANT_BRIDGE in links]
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += ["nft table sails_fip" for _ in [0] if "sails_fip" in nft]
    return found


def test_down_then_up_keeps_volumes(sandbox_cloud, user_conn):
    """Last in this module: takes the whole sandbox down and brings it back. Down for longer
    than nova's service_down_time, as after any real pause: once `up` returns, a server boots
    at once (the compute service's heartbeat before the stop no longer counts, and the
    scheduler had found "No valid host" until the new one came)."""
    from sandbox import manager
    from sandbox.cloud import common

    conn = user_conn
    volume = conn.create_volume(1, name=f"keep-{uuid.uuid4().hex[:6]}", wait=True, timeout=120)
    path = common.VOLUMES / f"volume-{volume.id}"
    with path.open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"sandbox-data-survives")
    try:
        t0 = time.monotonic()
        manager.down()
        down_s = time.monotonic() - t0
        assert _sandbox_leftovers() == []
        time.sleep(max(0.0, 65 - down_s))  # the last heartbeat is now past service_down_time
        t0 = time.monotonic()
        manager.up()
        up_s = time.monotonic() - t0
        print(f"down {down_s:.1f} s, up {up_s:.1f} s")  # the bench's business, not a bound here
        server = conn.create_server(
            f"up-{uuid.uuid4().hex[:6]}", image=IMAGE, flavor=FLAVOR, network=NETWORK,
            auto_ip=False, wait=True, timeout=180,
        )  # fmt: skip
        try:
            assert server.status == "ACTIVE", server.fault
        finally:
            conn.delete_server(server.id, wait=True, timeout=120)
        assert conn.get_volume(volume.id).status == "available"
        with path.open("rb") as fh:
            fh.seek(4096)
            assert fh.read(21) == b"sandbox-data-survives"
    finally:
        if manager.cloud_running():
            conn.delete_volume(volume.id, wait=True, timeout=120)
