"""The sandbox's guests on their own (no cloud): real systemd-nspawn guests on the tenant bridge.

A fresh guest is a stock cloud image (no sshfs, no venv, no pip, no package lists) whose first
boot is cloud-init's: the ubuntu user, the key, host keys made at first boot and their
fingerprints on the real console (at most 100 KiB of it), the ephemeral disk at /mnt, the
user-data. Then: a late sshd while the guest already runs, key-only SSH, systemd as PID 1 and
passwordless sudo, a volume plugged by serial, fstab mounts that survive ``sudo reboot`` from
inside, power-off from inside, host-side reboots, several guests at once, and nothing left
behind by destroy_guest and cleanup_all.
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
    SHARED_USER_DATA,
    GuestHandle,
    guest_factory,
    guest_key,
    guest_rootfs,
    shared_guest,
)

pytestmark = [pytest.mark.sandbox]

FINGERPRINTS = re.compile(
    rb"-----BEGIN SSH HOST KEY FINGERPRINTS-----\r?\n(.*?)-----END SSH HOST KEY FINGERPRINTS-----",
    re.S,
)
KEYS = re.compile(
    rb"-----BEGIN SSH HOST KEY KEYS-----\r?\n(.*?)-----END SSH HOST KEY KEYS-----", re.S
)


def console_fingerprints(console: bytes) -> list[list[str]]:
    """Each fingerprint block cloud-init printed: its ``SHA256:...`` fingerprints. cloud-init
    prints them through ``logger -s``, so each line carries a syslog prefix
    (``<14>Dec  2 15:30:01 cloud-init: 256 SHA256:... root@host (ED25519)``)."""
    return [
        re.findall(r"\b\d+ (SHA256:\S+) \S+ \((?:ED25519|ECDSA|RSA)\)", block.decode())
        for block in FINGERPRINTS.findall(console)
    ]


def scanned_keys(ip: str) -> list[str]:
    """The host keys the guest's sshd presents ("type base64")."""
    return [
        " ".join(ln.split()[1:3])
        for ln in _sh("ssh-keyscan", "-T", "5", ip).splitlines()
        if ln and not ln.startswith("#")
    ]


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


def test_fresh_guest_is_a_stock_cloud_image(shared_guest: GuestHandle) -> None:
    """What the product must install itself is missing, as on Ubuntu's cloud image."""
    g = shared_guest
    for tool in ("sshfs", "fusermount3", "pip", "pip3"):
        assert g.ssh(f"command -v {tool}").returncode != 0, f"{tool} is in the image"
    absent = g.ssh("dpkg-query -W -f '${db:Status-Abbrev}\\n' sshfs fuse3 python3-venv python3-pip")
    assert "ii" not in absent.stdout, absent.stdout
    # python3 without ensurepip: venv fails (leaving bin/python behind), pip is absent
    venv = g.ssh("python3 -m venv /tmp/venv")
    assert venv.returncode != 0 and "because ensurepip is not" in venv.stdout + venv.stderr
    assert g.check("test -x /tmp/venv/bin/python && echo left-behind").strip() == "left-behind"
    assert "No module named pip" in g.ssh("python3 -m pip --version").stderr
    assert g.ssh("python3 -c 'import ensurepip'").returncode != 0
    # what the image does hold
    present = g.check(
        "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' systemd openssh-server sudo python3"
        " e2fsprogs util-linux curl ca-certificates procps cloud-init unattended-upgrades"
    )
    assert all(line.split()[1] == "ii" for line in present.splitlines()), present
    assert len(present.splitlines()) == 11
    # empty package lists, no Debian archive, apt's timers on as on a fresh VM
    assert g.check("find /var/lib/apt/lists -type f ! -name lock | wc -l").strip() == "0"
    assert g.ssh("grep -rs debian.org /etc/apt/sources.list /etc/apt/sources.list.d").stdout == ""
    enabled = g.check("systemctl is-enabled apt-daily.timer apt-daily-upgrade.timer").split()
    assert enabled == ["enabled", "enabled"]
    # FUSE can be used once the product installs sshfs
    assert g.check("stat -c %F:%t:%T /dev/fuse").strip() == "character special file:a:e5"
    g.check("sudo python3 -c \"import os; os.close(os.open('/dev/fuse', os.O_RDWR))\"")


def test_cloud_init_did_the_first_boot(shared_guest: GuestHandle) -> None:
    from sandbox import guests

    g = shared_guest
    status = g.ssh("cloud-init status --long")
    assert status.returncode == 0 and "status: done" in status.stdout, status.stdout
    assert g.check("cat /var/lib/cloud/data/instance-id").strip() == guests.instance_uuid(g.name)
    # the NIC of network_data.json is found by its MAC: the guest sees its own devices in /sys
    assert g.check("ls /sys/class/net").split() == ["eth0", "lo"]
    assert g.check("cat /sys/class/net/eth0/address").strip() == g.spec.mac
    # the ubuntu user is cloud-init's: sudo rule, groups, shell, locked password
    log = g.check("sudo cat /var/log/cloud-init.log")
    assert "Adding user ubuntu" in log
    assert "NOPASSWD:ALL" in g.check("sudo cat /etc/sudoers.d/90-cloud-init-users")
    assert {"sudo", "adm"} <= set(g.check("id -nG").split())
    assert g.check("getent passwd ubuntu").strip().endswith(":/home/ubuntu:/bin/bash")
    assert g.check("sudo passwd -S ubuntu").split()[1] == "L"
    assert g.check("cat ~/.ssh/authorized_keys").split()[:2] == g.spec.authorized_keys.split()[:2]
    # host keys made in the guest at its first boot: none in the image
    lower = Path(guests._load(g.name)["lower"])
    assert not list((lower / "etc/ssh").glob("ssh_host_*"))
    assert len(list((guests.GUESTS_DIR / g.name / "upper/etc/ssh").glob("ssh_host_*_key.pub"))) == 3
    # the ephemeral disk mounted at /mnt by cloud-init's mounts module; the user-data ran
    assert g.check("findmnt -n -o SOURCE /mnt").strip() == "/dev/vdb"
    assert "comment=cloudconfig" in g.check("grep /mnt /etc/fstab")
    assert g.check("cat /var/tmp/user-data-ran").strip() == "user-data ran as root"
    assert SHARED_USER_DATA.splitlines()[0] == "#!/bin/sh"
    assert g.check("hostname").strip() == g.spec.hostname


def test_console_is_the_real_console(shared_guest: GuestHandle) -> None:
    from sandbox import guests

    g = shared_guest
    console = guests.console_output(g.name)
    assert isinstance(console, bytes) and 0 < len(console) <= 100 * 1024
    assert b"Reached target" in console  # systemd's boot status, as a VM's console shows it
    assert b"Cloud-init v." in console and b"finished at" in console
    blocks = console_fingerprints(console)
    assert len(blocks) == 1, console[-3000:]
    keys = scanned_keys(g.ip)
    assert len(keys) == 3, keys
    assert sorted(blocks[0]) == sorted(fingerprint(key) for key in keys)
    printed = KEYS.search(console)
    assert printed and all(key.encode() in printed.group(1) for key in keys)


def test_late_sshd_while_running(guest_factory, shared_guest: GuestHandle) -> None:
    """ACTIVE is early: the guest runs at once; sshd answers only after its boot delay."""
    from sandbox import guests

    delay = 20
    t0 = time.monotonic()
    g: GuestHandle = guest_factory(sshd_delay=delay, wait=False)
    started = time.monotonic() - t0
    assert guests.power_state(g.name) == "running"
    probe = subprocess.run(
        ["ssh-keyscan", "-T", "3", g.ip], capture_output=True, text=True, timeout=30
    )
    assert probe.stdout.strip() == "", "sshd answered before its delay"
    login = g.wait_ssh(delay + 90)
    print(f"started in {started:.1f} s; SSH answered {time.monotonic() - t0:.1f} s after start")
    assert time.monotonic() - t0 >= delay
    # host keys are the guest's own: another guest has others
    assert set(scanned_keys(g.ip)).isdisjoint(scanned_keys(shared_guest.ip))
    assert login > 0


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

    # cloud-init printed the host key fingerprints once, at first boot
    first = console_fingerprints(guests.console_output(g.name))
    assert len(first) == 1 and len(first[0]) == 3, first

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

    # reboots do not make new host keys nor print them again (cloud-init: once per instance)
    assert console_fingerprints(guests.console_output(g.name)) == first
    assert g.check("cloud-init status").split() == ["status:", "done"]
    # the console keeps its last 100 KiB: enough output and the fingerprints scroll away
    g.check("sudo sh -c 'yes console-filler | head -c 150000 > /dev/console'")
    deadline = time.monotonic() + 10
    while console_fingerprints(guests.console_output(g.name)):
        assert time.monotonic() < deadline, "the fingerprints did not scroll away"
        time.sleep(0.2)
    assert len(guests.console_output(g.name)) == 100 * 1024

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


def test_three_guests_at_once(guest_factory) -> None:
    from sandbox import guests

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        made = list(pool.map(lambda _: guest_factory(), range(3)))
    print(f"3 guests started in parallel in {time.monotonic() - t0:.2f} s")
    for g in made:
        assert guests.power_state(g.name) == "running"
        assert g.check("hostname").strip() == g.spec.hostname
    # guests reach each other on the tenant subnet, and the gateway on the host
    a, b = made[0], made[1]
    assert a.check(f"ping -c1 -W2 {b.ip} >/dev/null && echo ok").strip() == "ok"
    from sandbox import layout

    assert a.check(f"ping -c1 -W2 {layout.TENANT_GATEWAY} >/dev/null && echo ok").strip() == "ok"
    assert _sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"
    # each guest's systemd has a cgroup tree of its own (one shared tree let a guest's systemd
    # remove or fill the cgroups of another's units mid-boot)
    trees = set()
    for g in made:
        pid1 = guests._container_pid1(g.name)
        assert pid1
        lines = Path(f"/proc/{pid1}/cgroup").read_text().splitlines()
        tree = [ln for ln in lines if ln.split(":")[1] in ("name=systemd", "")]
        assert tree and all(g.name in ln for ln in tree), tree
        trees.add(tuple(tree))
    assert len(trees) == 3
    # and a unit stopped in one guest leaves the same unit of the others running
    for g in made:
        g.check("sudo systemd-run --unit=sails-probe sleep 600")
    a.check("sudo systemctl stop sails-probe.service")
    for g in made[1:]:
        assert g.check("systemctl is-active sails-probe.service || true").strip() == "active"
    assert a.check("systemctl is-active sails-probe.service || true").strip() == "inactive"


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
