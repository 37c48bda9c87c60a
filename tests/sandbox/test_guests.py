"""The sandbox's guests on their own (no cloud): real systemd-nspawn guests on the tenant bridge.

Boot and key-only SSH, systemd as PID 1 and passwordless sudo, console fingerprints against
ssh-keyscan, a volume plugged by serial, fstab mounts that survive ``sudo reboot`` from inside,
power-off from inside, host-side reboots, several guests at once, and nothing left behind by
destroy_guest and cleanup_all.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fixtures.guests)
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.ssh import fingerprint
from tests.fixtures.guests import (  # noqa: F401  (fixtures)
    GuestHandle,
    guest_factory,
    guest_key,
    guest_rootfs,
)

pytestmark = [pytest.mark.sandbox]


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def leftovers(
    guests_dir: Path, netns_prefix: str, files: list[Path], veths: list[str]
) -> list[str]:
    """Namespaces, veths, loop devices and mounts of the library that still exist."""
    netns = _sh("ip", "netns", "list").splitlines()
    found = [f"netns {line}" for line in netns if line.startswith(netns_prefix)]
    links = [ln.split(":")[1].strip().split("@")[0] for ln in _sh("ip", "-o", "link").splitlines()]
    found += [f"veth {veth}" for veth in veths if veth in links]
    loops = _sh("losetup", "-a")
    found += [f"loop {line}" for line in loops.splitlines() if str(guests_dir) in line]
    found += [f"loop for {f}" for f in files if str(f) in loops]
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(guests_dir) + "/")
    ]
    return found


def sparse(path: Path, size: int = 2**30) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def wait_state(name: str, state: str, timeout: float = 30) -> None:
    from sandbox import guests

    deadline = time.monotonic() + timeout
    while guests.power_state(name) != state:
        assert time.monotonic() < deadline, (
            f"{name} never became {state}: {guests.power_state(name)}"
        )
        time.sleep(0.1)


def test_guest_life_cycle(guest_factory, tmp_path: Path) -> None:
    from sandbox import guests

    t0 = time.monotonic()
    g: GuestHandle = guest_factory(ephemeral_gb=1)
    booted = time.monotonic() - t0
    login = g.wait_ssh(10)
    print(f"start_guest {booted:.2f} s, first SSH login after {login:.2f} s more")
    assert guests.power_state(g.name) == "running"
    assert g.name in guests.list_guests()

    # systemd is PID 1, sudo needs no password, the ephemeral disk is /dev/vdb on /mnt
    out = g.check(
        "cat /proc/1/comm; sudo -n true && echo sudo-ok; findmnt -n -o SOURCE /mnt; hostname"
    )
    assert out.split() == ["systemd", "sudo-ok", "/dev/vdb", g.spec.hostname], out
    assert g.check("systemctl is-system-running").strip() in ("running", "degraded")
    # FUSE works inside (sshfs of the guest's own sshd, as the flows mount CANFAR's /arc)
    out = g.check(
        "ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/self && cat ~/.ssh/self.pub >> ~/.ssh/authorized_keys"
        " && mkdir -p ~/m && sshfs -o IdentityFile=$HOME/.ssh/self,StrictHostKeyChecking=no"
        " localhost:/etc ~/m && findmnt -n -o FSTYPE ~/m && test -f ~/m/hostname && fusermount3 -u ~/m"
        " && sed -i '$d' ~/.ssh/authorized_keys"
    )
    assert out.strip() == "fuse.sshfs", out
    # on-link tenant subnet only: no default route
    assert "default" not in g.check("ip route")
    # key only: a login without the key is refused
    r = subprocess.run(
        g.ssh_argv("true", "-o", "PubkeyAuthentication=no"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "publickey" in r.stderr

    # the console carries the host key fingerprints as cloud-init prints them
    console = guests.console_output(g.name)
    assert isinstance(console, bytes)
    block = re.search(
        rb"-----BEGIN SSH HOST KEY FINGERPRINTS-----\n(.*?)-----END SSH HOST KEY FINGERPRINTS-----",
        console,
        re.S,
    )
    assert block, console[-2000:]
    assert b"Reached target" in console and b"\r" not in console  # the guest's boot log
    lines = block.group(1).decode().splitlines()
    assert all(re.fullmatch(r"\d+ SHA256:\S+ \S+ \((ED25519|ECDSA|RSA)\)", ln) for ln in lines), (
        lines
    )
    scanned = [
        ln.split(None, 1)[1]
        for ln in _sh("ssh-keyscan", "-T", "5", g.ip).splitlines()
        if ln and not ln.startswith("#")
    ]
    assert len(scanned) == 3, scanned
    for key in scanned:
        assert fingerprint(key) in block.group(1).decode()
        assert (
            " ".join(key.split()[:2]).encode() in console.split(b"-----BEGIN SSH HOST KEY KEYS")[1]
        )

    # a 1 GiB volume by serial: /dev/vdc (vdb is the ephemeral disk)
    volume = sparse(tmp_path / "volume.img")
    serial = str(uuid.uuid4())
    by_id = f"/dev/disk/by-id/virtio-{serial[:20]}"
    assert guests.attach_volume(g.name, str(volume), serial) == "/dev/vdc"
    assert guests.attach_volume(g.name, str(volume), serial) == "/dev/vdc"  # idempotent
    assert g.check(f"test -b /dev/vdc && readlink -f {by_id}").strip() == "/dev/vdc"
    g.check(
        f"sudo mkfs.ext4 -q {by_id} && "
        f"echo UUID=$(sudo blkid -p -s UUID -o value {by_id}) /data ext4 defaults,nofail 0 2"
        " | sudo tee -a /etc/fstab >/dev/null && sudo mkdir -p /data && sudo mount /data && "
        "echo kept | sudo tee /data/f >/dev/null && sudo touch /run/booted-before"
    )

    # `sudo reboot` from inside: the guest comes back, the volume by-id, /data mounted by fstab
    g.fire("sudo reboot")
    wait_state(g.name, "running")
    deadline = time.monotonic() + 60
    while g.ssh("test -e /run/booted-before").returncode == 0:
        assert time.monotonic() < deadline, "the guest did not reboot"
        time.sleep(0.3)
    g.wait_ssh(60)
    out = g.check(
        f"readlink -f {by_id}; findmnt -n -o SOURCE /data; cat /data/f; findmnt -n -o SOURCE /mnt"
    )
    assert out.split() == ["/dev/vdc", "/dev/vdc", "kept", "/dev/vdb"], out
    assert "exited 133" in (guests.GUESTS_DIR / g.name / "supervisor.log").read_text()

    # detach: node, link and loop device go away
    g.check("sudo umount /data")
    guests.detach_volume(g.name, serial)
    guests.detach_volume(g.name, serial)  # idempotent
    assert g.ssh(f"test -e {by_id} || test -e /dev/vdc").returncode != 0
    assert str(volume) not in _sh("losetup", "-a")

    # host-side soft and hard reboots
    for hard in (False, True):
        g.check("sudo touch /run/booted-before")
        guests.reboot_guest(g.name, hard=hard)
        assert g.ssh("test -e /run/booted-before").returncode == 1, f"hard={hard}"
        assert g.check("findmnt -n -o SOURCE /mnt").strip() == "/dev/vdb"

    # `sudo poweroff` from inside: shutdown, then power on again with its disk state
    g.fire("sudo poweroff")
    wait_state(g.name, "shutdown")
    time.sleep(1)
    assert guests.power_state(g.name) == "shutdown"
    guests.start_guest(g.spec)
    assert g.check("grep -c /data /etc/fstab").strip() == "1"
    guests.stop_guest(g.name)
    assert guests.power_state(g.name) == "shutdown"

    names = guests._load(g.name)["names"]
    guests.destroy_guest(g.name)
    assert guests.power_state(g.name) == "absent"
    assert not (guests.GUESTS_DIR / g.name).exists()
    assert volume.exists()  # the volume file is Cinder's
    assert names["netns"] not in _sh("ip", "netns", "list")
    assert names["veth"] not in _sh("ip", "-o", "link")
    assert str(volume) not in _sh("losetup", "-a")
    assert str(guests.GUESTS_DIR / g.name) not in Path("/proc/self/mountinfo").read_text()


def test_four_guests_at_once(guest_factory) -> None:
    from sandbox import guests

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        made = list(pool.map(lambda _: guest_factory(), range(4)))
    print(f"4 guests started in parallel in {time.monotonic() - t0:.2f} s")
    for g in made:
        assert guests.power_state(g.name) == "running"
        assert g.check("hostname").strip() == g.spec.hostname
    # guests reach each other on the tenant subnet, and the gateway on the host
    a, b = made[0], made[1]
    assert a.check(f"ping -c1 -W2 {b.ip} >/dev/null && echo ok").strip() == "ok"
    from sandbox import layout

    assert a.check(f"ping -c1 -W2 {layout.TENANT_GATEWAY} >/dev/null && echo ok").strip() == "ok"
    assert _sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"


def test_guest_outlives_its_caller(guest_factory) -> None:
    """A guest started by a process that then exits (a restarted compute service) runs on."""
    import dataclasses
    import json
    import sys

    from sandbox import guests

    g = guest_factory(start=False)
    code = (
        "import json, sys; from sandbox import guests; "
        "guests.start_guest(guests.GuestSpec(**json.loads(sys.argv[1])))"
    )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(dataclasses.asdict(g.spec))],
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert guests.power_state(g.name) == "running"
    assert g.check("cat /proc/1/comm").strip() == "systemd"
    supervisor = int((guests.GUESTS_DIR / g.name / "supervisor.pid").read_text())
    assert os.getsid(supervisor) == supervisor  # its own session


def test_failed_start_cleans_up(guest_factory) -> None:
    from sandbox import guests

    g = guest_factory(start=False, ephemeral_gb=1)
    with pytest.raises(guests.GuestError):
        guests.start_guest(g.spec, timeout=0.0)
    assert guests.power_state(g.name) == "absent"
    assert not (guests.GUESTS_DIR / g.name).exists()
    names = guests._names(g.name)
    assert leftovers(guests.GUESTS_DIR / g.name, names["netns"], [], [names["veth"]]) == []
    assert not any(
        str(guests.GUESTS_DIR / g.name) in " ".join(guests._cmdline(p))
        for p in guests._our_processes()
    )


@pytest.fixture
def private_guests_dir(guest_rootfs: Path) -> Iterator[Path]:
    """A guests directory of its own, so cleanup_all touches no other guest on this machine."""
    from sandbox import guests, layout

    saved = guests.GUESTS_DIR
    guests.GUESTS_DIR = layout.STATE_DIR / f"test-guests-{uuid.uuid4().hex[:8]}"
    try:
        yield guests.GUESTS_DIR
    finally:
        guests.cleanup_all()
        subprocess.run(["rm", "-rf", str(guests.GUESTS_DIR)], check=False)
        guests.GUESTS_DIR = saved


def test_cleanup_all_leaves_nothing(
    private_guests_dir: Path, guest_factory, tmp_path: Path
) -> None:
    from sandbox import guests

    prefix = guests._netns_prefix()
    a = guest_factory(ephemeral_gb=1)
    b = guest_factory()
    veths = [guests._load(g.name)["names"]["veth"] for g in (a, b)]
    volume = sparse(tmp_path / "v.img")
    assert guests.attach_volume(b.name, str(volume), "vol-cleanup") == "/dev/vdb"
    # a crashed supervisor: its guest runs on unsupervised
    os.kill(int((private_guests_dir / a.name / "supervisor.pid").read_text()), signal.SIGKILL)
    assert guests.power_state(a.name) == "running"

    guests.cleanup_all()
    for g in (a, b):
        assert guests.power_state(g.name) == "shutdown"
        assert g.ssh("true", timeout=20).returncode != 0
    assert leftovers(private_guests_dir, prefix, [volume], veths) == []
    assert not guests._our_processes()

    # the guests keep their disks and boot again after a cleanup
    guests.start_guest(b.spec)
    assert b.check("readlink -f /dev/disk/by-id/virtio-vol-cleanup").strip() == "/dev/vdb"
    guests.cleanup_all()
    assert leftovers(private_guests_dir, prefix, [volume], veths) == []
