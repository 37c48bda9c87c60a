"""The guests' signed Debian package mirror, seen from real sandbox guests.

A guest starts with the mirror's deb822 source and signing key and no package lists;
``apt-get update`` verifies the signature and ``apt-get install`` installs from the mirror. An
unsigned or tampered repository is refused by apt; 503 answers make the update fail until the
fault is cleared; with the dpkg lock held at first boot a plain ``apt-get install`` fails with
apt's lock error and one with ``DPkg::Lock::Timeout`` waits for it.

HTTP faults are scoped to the test's own guest (``clients``), so other users of the shared
sandbox do not meet them.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fixtures.guests)
from __future__ import annotations

import contextlib
import json
import shlex
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures.guests import (  # noqa: F401  (fixtures)
    GuestHandle,
    guest_factory,
    guest_key,
    guest_rootfs,
)

pytestmark = [pytest.mark.sandbox]

#: In the mirror's package list, in no guest image.
PROBE = "hello"
APT = "sudo DEBIAN_FRONTEND=noninteractive apt-get -q"
#: Where the dpkg lock is not what a test is about (the guests run apt's own timers).
APT_WAIT = f"{APT} -o DPkg::Lock::Timeout=120"


@pytest.fixture(scope="module")
def mirror(guest_rootfs: Path) -> Iterator[ModuleType]:
    from sandbox import mirror

    mirror.up()
    yield mirror


@pytest.fixture(scope="module")
def fault_guest(
    mirror: ModuleType, guest_rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestHandle]:
    """One guest for the fault tests, which start by dropping its package lists."""
    from blocks.ssh import SSHKeyPair
    from sandbox import guests, layout
    from tests.fixtures.guests import TEST_HOSTS

    base = layout.TENANT_CIDR.split("/")[0].rsplit(".", 1)[0]
    taken = set()
    for record in (layout.STATE_DIR / "guests").glob("*/guest.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            taken.add(json.loads(record.read_text())["spec"]["ip"])
    host = next((h for h in TEST_HOSTS if f"{base}.{h}" not in taken), None)
    if host is None:
        raise RuntimeError("no free test address left for the mirror's fault guest")
    pair = SSHKeyPair.generate("ed25519", comment="sandbox-mirror-test")
    key = pair.write_private_key(tmp_path_factory.mktemp("mirror-guest") / "id_ed25519")
    spec = guests.GuestSpec(
        name=f"test-{uuid.uuid4()}",
        hostname=f"guest-{host}",
        mac=f"fa:16:3e:5a:00:{host:02x}",
        ip=f"{base}.{host}",
        prefix=int(layout.TENANT_CIDR.split("/")[1]),
        gateway=layout.TENANT_GATEWAY,
        authorized_keys=pair.public_key,
    )
    try:
        guests.start_guest(spec)
        yield GuestHandle(spec=spec, key=key)
    finally:
        guests.destroy_guest(spec.name)


def _out(r) -> str:  # type: ignore[no-untyped-def]
    return r.stdout + r.stderr


def _forget_lists(g: GuestHandle) -> None:
    """Back to a fresh VM's state: no package lists, the probe package not installed."""
    g.check(
        f"{APT_WAIT} purge -y {PROBE} >/dev/null 2>&1; "
        "sudo find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock -delete"
    )


def _candidate(g: GuestHandle) -> str:
    policy = g.check(f"apt-cache policy {PROBE}")
    return next((ln.split()[1] for ln in policy.splitlines() if "Candidate:" in ln), "(none)")


def test_up_is_idempotent(mirror: ModuleType) -> None:
    pid = mirror._alive()
    assert pid is not None
    assert mirror.up() == mirror.url()
    assert mirror._alive() == pid, "a second up() restarted a running mirror"
    status = mirror.status()
    assert status["running"] is True
    assert status["packages"] > len(mirror.packages())  # the dependencies came along


def test_fresh_guest_installs_from_the_signed_mirror(
    mirror: ModuleType, guest_factory: Callable[..., GuestHandle]
) -> None:
    g = guest_factory()
    source = g.check("cat /etc/apt/sources.list.d/sandbox.sources")
    assert f"URIs: {mirror.url()}" in source
    assert "Signed-By: /etc/apt/keyrings/sails-sandbox.gpg" in source
    assert "trusted" not in source
    # as on a fresh VM: no package lists before the first update
    assert g.check("ls /var/lib/apt/lists/ | grep -c _Packages || true").strip() == "0"
    r = g.ssh(f"{APT} install -y {PROBE}", timeout=120)
    assert r.returncode != 0 and f"Unable to locate package {PROBE}" in _out(r)

    r = g.ssh(f"{APT} update", timeout=120)
    out = _out(r)
    assert r.returncode == 0, out
    assert f"{mirror.url()} bookworm InRelease" in out
    assert "GPG error" not in out and "not signed" not in out, out
    # apt keeps an InRelease only once its signature checked out against Signed-By
    lists = g.check("ls /var/lib/apt/lists/")
    assert "8481_debian_dists_bookworm_InRelease" in lists, lists
    policy = g.check(f"apt-cache policy {PROBE}")
    assert f"{mirror.url()} bookworm/main amd64 Packages" in policy, policy

    r = g.ssh(f"{APT_WAIT} install -y {PROBE} sshfs python3-venv", timeout=300)
    assert r.returncode == 0, _out(r)
    assert g.check(PROBE).strip() == "Hello, world!"
    assert g.check("command -v sshfs && python3 -c 'import ensurepip' && echo ok").endswith("ok\n")


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("unsigned", "is not signed"),
        ("tampered", "The following signatures were invalid: BADSIG"),
    ],
)
def test_apt_refuses_an_unsigned_or_tampered_repository(
    mirror: ModuleType, fault_guest: GuestHandle, repo: str, message: str
) -> None:
    g = fault_guest
    _forget_lists(g)
    with mirror.fault(repo=repo, clients=[g.ip]):
        r = g.ssh(f"{APT} update", timeout=120)
        assert message in _out(r), _out(r)
        assert r.returncode != 0, _out(r)
        assert _candidate(g) == "(none)"
        r = g.ssh(f"{APT} install -y {PROBE}", timeout=120)
        assert r.returncode != 0, _out(r)
    # the fault cleared: the same guest updates and installs
    r = g.ssh(f"{APT} update", timeout=120)
    assert r.returncode == 0 and "GPG error" not in _out(r), _out(r)
    assert _candidate(g) != "(none)"
    assert g.ssh(f"{APT_WAIT} install -y {PROBE}", timeout=120).returncode == 0


def test_mirror_failures_make_the_update_fail_until_cleared(
    mirror: ModuleType, fault_guest: GuestHandle
) -> None:
    g = fault_guest
    _forget_lists(g)
    # every request fails (apt retries, then gives up on the mirror's lists)
    with mirror.fault(fail_rate=1.0, clients=[g.ip]):
        r = g.ssh(f"{APT} -o APT::Update::Error-Mode=any update", timeout=120)
        assert r.returncode != 0, _out(r)
        assert f"Failed to fetch {mirror.url()}/dists/bookworm/InRelease  503" in _out(r)
        assert _candidate(g) == "(none)"
    # the next request fails: without retries the update fails once, then works
    with mirror.fault(fail_next=1, clients=[g.ip]):
        r = g.ssh(f"{APT} -o Acquire::Retries=0 -o APT::Update::Error-Mode=any update")
        assert r.returncode != 0 and " 503 " in _out(r), _out(r)
        assert mirror.faults()["fail_next"] == 0
        r = g.ssh(f"{APT} -o Acquire::Retries=0 -o APT::Update::Error-Mode=any update")
        assert r.returncode == 0, _out(r)
    _forget_lists(g)
    # two failures in a row are absorbed by apt's own retries
    with mirror.fault(fail_next=2, clients=[g.ip]):
        r = g.ssh(f"{APT} -o Acquire::Retries=3 -o APT::Update::Error-Mode=any update")
        assert r.returncode == 0 and "Failed to fetch" not in _out(r), _out(r)
        assert mirror.faults()["fail_next"] == 0
    assert g.ssh(f"{APT_WAIT} install -y {PROBE}", timeout=120).returncode == 0


def test_a_slow_mirror_delays_every_answer(mirror: ModuleType, fault_guest: GuestHandle) -> None:
    g = fault_guest
    curl = (
        "curl -s -o /dev/null -w '%{http_code} %{time_total}' "
        f"{mirror.url()}/dists/bookworm/InRelease"
    )
    with mirror.fault(delay=2.0, clients=[g.ip]):
        code, seconds = g.check(curl).split()
    assert code == "200"
    assert float(seconds) >= 2.0  # the delay is a lower bound on every answer


def test_dpkg_lock_held_at_first_boot(
    mirror: ModuleType, guest_factory: Callable[..., GuestHandle], tmp_path: Path
) -> None:
    from sandbox import guests

    g = guest_factory(start=False)
    before = mirror.faults()["dpkg_lock_seconds"]
    with mirror.fault(dpkg_lock_seconds=30, dpkg_lock_guests=[g.name]):
        guests.start_guest(g.spec)
        # a guest prepared meanwhile under another name gets the source, not the fault
        other = tmp_path / "another-guest" / "upper"
        other.mkdir(parents=True)
        mirror.prepare_guest(other)
        assert (other / mirror.GUEST_SOURCES).read_text() == mirror.sources_text()
        assert not (other / "etc/systemd/system" / mirror.LOCK_UNIT).exists()
    assert mirror.faults()["dpkg_lock_seconds"] == before  # put back for the guests after
    assert g.check(f"systemctl is-active {mirror.LOCK_UNIT}").strip() == "active"
    assert g.ssh(f"{APT} update", timeout=120).returncode == 0
    r = g.ssh(f"{APT} install -y {PROBE}", timeout=120)
    assert r.returncode == 100, _out(r)
    assert "Could not get lock /var/lib/dpkg/lock-frontend" in _out(r), _out(r)
    r = g.ssh(f"{APT} -o DPkg::Lock::Timeout=180 install -y {PROBE}", timeout=300)
    assert r.returncode == 0, _out(r)
    assert "Waiting for cache lock" in _out(r), _out(r)  # it did wait for the holder
    assert g.check(PROBE).strip() == "Hello, world!"
    assert g.check(f"systemctl is-active {mirror.LOCK_UNIT} || true").strip() == "inactive"
    # only the first boot: after a reboot nothing holds the lock
    guests.reboot_guest(g.name)
    g.wait_ssh()
    shown = g.check(f"systemctl show -p ConditionResult {mirror.LOCK_UNIT}")
    assert shown.strip() == "ConditionResult=no"
    r = g.ssh(f"{APT} install -y --reinstall {PROBE}", timeout=120)
    assert r.returncode == 0, _out(r)


def test_an_install_cut_off_mid_unpack_is_repaired(
    mirror: ModuleType,
    guest_factory: Callable[..., GuestHandle],
    guest_key: tuple[str, Path],
) -> None:
    """An apt run killed while dpkg unpacks (a dropped connection, a reboot) leaves packages
    unpacked without their dependencies and dpkg's journal behind; apt then refuses every install.
    The packages step repairs it as an operator would and installs what it needs."""
    import subprocess

    from blocks.ssh import SSHKeyPair, fingerprint
    from core.config import BootstrapConfig
    from tasks.packages import ensure_packages, needed_packages
    from tasks.vm import VM

    g = guest_factory()
    assert g.ssh(f"{APT_WAIT} update", timeout=120).returncode == 0
    wanted = needed_packages(BootstrapConfig())
    # dpkg killed once its journal holds a change: mid-unpack, as in a run cut off
    apt = APT_WAIT.removeprefix("sudo ")
    cut = (
        f"({apt} install -y --no-install-recommends {' '.join(wanted)} >/tmp/apt.log 2>&1 &); "
        "until ls /var/lib/dpkg/updates | grep -q '^[0-9]'; do sleep 0.01; done; "
        "pkill -KILL -x dpkg; pkill -KILL -x apt-get; sleep 1; ls /var/lib/dpkg/updates"
    )
    left = g.check(f"sudo timeout 240 sh -c {shlex.quote(cut)}", timeout=300)
    assert left.split(), "dpkg's journal was empty after the kill"
    r = g.ssh(f"{APT_WAIT} install -y {PROBE}", timeout=120)
    assert r.returncode != 0 and "dpkg was interrupted" in _out(r), _out(r)

    scan = subprocess.run(
        ["ssh-keyscan", "-T", "5", "-t", "ed25519", g.ip], capture_output=True, text=True
    ).stdout.split()
    key = SSHKeyPair(private_key=guest_key[1].read_text(), public_key=guest_key[0])
    vm = VM(g.ip, key, host_keys=[fingerprint(f"{scan[1]} {scan[2]}")])
    try:
        record = ensure_packages(vm, BootstrapConfig())
    finally:
        vm.close()
    assert record.missing and record.reason.startswith("installed"), record
    assert g.check("sudo dpkg --audit").strip() == ""  # nothing half-installed is left
    assert g.ssh("sudo apt-get check").returncode == 0
    status = g.check(f"dpkg-query -W -f '${{db:Status-Abbrev}}\\n' {' '.join(wanted)}")
    assert status.split() == ["ii"] * len(wanted), status
    assert g.check("python3 -c 'import ensurepip' && command -v sshfs").strip().endswith("sshfs")
