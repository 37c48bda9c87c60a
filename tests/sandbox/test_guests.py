"""The sandbox's guests on their own: boot, SSH, devices, reboot from inside, power-off, cleanup."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

from blocks.ssh import SSHKeyPair, fingerprint
from tests.fixtures.canfar import need_root

pytestmark = [pytest.mark.sandbox]


def ssh(key: Path, ip: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
            f"ubuntu@{ip}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_ssh(key: Path, ip: str, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if ssh(key, ip, "true", timeout=10).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no ssh to {ip} within {deadline} s")


def test_guest_life_cycle(tmp_path: Path) -> None:
    need_root()
    from sandbox import guests

    guests.install()
    key = SSHKeyPair.generate()
    key_path = key.write_private_key(tmp_path / "id")
    name = str(uuid.uuid4())
    ip = "10.211.0.240"
    spec = guests.GuestSpec(
        name=name,
        hostname="guest-test",
        mac="fa:16:3e:00:02:40",
        ip=ip,
        prefix=24,
        gateway="10.211.0.1",
        authorized_keys=key.public_key,
        ephemeral_gb=1,
    )
    volume = tmp_path / "volume.img"
    with open(volume, "wb") as fh:
        fh.truncate(2**30)
    serial = uuid.uuid4().hex
    try:
        guests.start_guest(spec)
        assert guests.power_state(name) == "running"
        r = ssh(key_path, ip, "cat /proc/1/comm; sudo -n whoami; findmnt -n -o SOURCE /mnt")
        assert r.stdout.split() == ["systemd", "root", "/dev/vdb"], r.stderr
        # key-only: no password login is offered
        r = subprocess.run(
            [
                "ssh",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                f"ubuntu@{ip}",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "publickey" in r.stderr

        console = guests.console_output(name).decode()
        scanned = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", ip], capture_output=True, text=True, timeout=30
        ).stdout.split()
        assert "-----BEGIN SSH HOST KEY FINGERPRINTS-----" in console
        assert fingerprint(f"{scanned[1]} {scanned[2]}") in console

        assert guests.attach_volume(name, str(volume), serial) == "/dev/vdc"
        by_id = f"/dev/disk/by-id/virtio-{serial[:20]}"
        r = ssh(
            key_path,
            ip,
            f"readlink -f {by_id} && sudo mkfs.ext4 -q {by_id} && "
            f"echo UUID=$(sudo blkid -p -s UUID -o value {by_id}) /data ext4 defaults,nofail 0 2"
            " | sudo tee -a /etc/fstab >/dev/null && sudo mkdir -p /data && sudo mount /data && "
            "echo kept | sudo tee /data/f >/dev/null",
        )
        assert r.returncode == 0 and r.stdout.strip() == "/dev/vdc", r.stderr

        # `sudo reboot` from inside: the guest comes back with its devices and mounts
        subprocess.Popen(
            [
                "ssh",
                "-i",
                str(key_path),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                f"ubuntu@{ip}",
                "sudo reboot",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2)
        wait_ssh(key_path, ip)
        r = ssh(key_path, ip, f"cat /data/f; readlink -f {by_id}; uptime -s")
        assert r.stdout.split()[:2] == ["kept", "/dev/vdc"], r.stdout + r.stderr
        assert guests.power_state(name) == "running"

        guests.detach_volume(name, serial)
        assert ssh(key_path, ip, f"test -e {by_id}").returncode != 0

        subprocess.Popen(
            [
                "ssh",
                "-i",
                str(key_path),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                f"ubuntu@{ip}",
                "sudo poweroff",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if guests.power_state(name) == "shutdown":
                break
            time.sleep(0.2)
        assert guests.power_state(name) == "shutdown"
        guests.start_guest(spec)  # powers on again with its disk state
        wait_ssh(key_path, ip)
    finally:
        guests.destroy_guest(name)
    assert guests.power_state(name) == "absent"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    mounts = Path("/proc/mounts").read_text()
    assert name.replace("-", "")[:10] not in ns
    assert str(volume) not in loops and name not in mounts
