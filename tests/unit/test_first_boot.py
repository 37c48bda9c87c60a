"""What a real first boot shows the product, read by its pure parts: cloud-init's console, apt's
answers, dpkg's status, ``cloud-init status``, a shell that lacks a command; and the venv probe
and a missing tool on this machine (``LocalHost``); the wait for a port on loopback."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blocks.ssh import fingerprint
from core.config import BootstrapConfig
from core.errors import (
    BootstrapError,
    MissingToolError,
    RemoteCommandError,
    is_transient,
    missing_tool,
)
from tasks.arc import START_LIMIT_BURST, unit_text
from tasks.cloud.console import parse_fingerprints
from tasks.first_boot import cloud_init_state, wait_for_port
from tasks.packages import (
    NO_MAIN_CLUSTER,
    AptOutcome,
    classify_apt,
    install_stages,
    lists_stale,
    missing_packages,
    needed_packages,
    parse_dpkg_status,
)
from tasks.vm import LocalHost


def host_keys(tmp_path: Path) -> list[tuple[str, str]]:
    """Three real host keys: (public key line, `ssh-keygen -l` line)."""
    out = []
    for kind, bits in (("ecdsa", "256"), ("ed25519", "256"), ("rsa", "3072")):
        path = tmp_path / f"ssh_host_{kind}_key"
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                kind,
                "-b",
                bits,
                "-N",
                "",
                "-C",
                "root@vm",
                "-f",
                str(path),
            ],
            check=True,
        )
        listed = subprocess.run(
            ["ssh-keygen", "-l", "-f", f"{path}.pub"], capture_output=True, text=True, check=True
        ).stdout.strip()
        out.append(((tmp_path / f"{path.name}.pub").read_text().strip(), listed))
    return out


def console(keys: list[tuple[str, str]], *, with_keys_block: bool = True) -> str:
    """A console log as an Ubuntu cloud image prints it on its first boot (CRLF line ends, a
    syslog prefix on the fingerprint lines, a kernel line interleaved, the ci-info tables)."""
    p = "<14>Dec  2 15:01:07 ec2: "
    lines = [
        "[    0.000000] Linux version 6.8.0-31-generic (buildd@lcy02-amd64-080)",
        "[    4.512031] cloud-init[512]: Cloud-init v. 24.1.3-0ubuntu3 running 'init' at "
        "Wed, 02 Dec 2026 15:00:41 +0000. Up 4.48 seconds.",
        "ci-info: ++++++++++++++++++++++++Net device info+++++++++++++++++++++++++",
        "ci-info: | Device |  Up  |  Address  |    Mask    | Scope | Hw-Address |",
        "ci-info: |  ens3  | True | 10.0.0.12 | 255.255.255.0 | global | fa:16:3e:aa |",
        "ci-info: +++++Authorized keys from /home/ubuntu/.ssh/authorized_keys for user ubuntu++++",
        "ci-info: | Keytype |                Fingerprint (sha256)                | Options |",
        "ci-info: | ssh-ed25519 | 6c:1f:0e:2d:6a:52:0e:44:1b:9c:aa:aa:aa:aa:aa:aa |    -    |",
        f"{p}#############################################################",
        f"{p}-----BEGIN SSH HOST KEY FINGERPRINTS-----",
        f"{p}{keys[0][1]}",
        "[   31.104212] random: crng init done",
        f"{p}{keys[1][1]}",
        f"{p}{keys[2][1]}",
        f"{p}-----END SSH HOST KEY FINGERPRINTS-----",
        f"{p}#############################################################",
    ]
    if with_keys_block:
        lines += [
            "-----BEGIN SSH HOST KEY KEYS-----",
            *(k[0] for k in keys),
            "-----END SSH HOST KEY KEYS-----",
        ]
    lines.append(
        "[   32.901833] cloud-init[1041]: Cloud-init v. 24.1.3-0ubuntu3 finished at Wed, 02 "
        "Dec 2026 15:01:07 +0000. Datasource DataSourceOpenStackLocal.  Up 32.88 seconds"
    )
    return "\r\n".join(lines) + "\r\n"


def test_fingerprints_from_a_real_cloud_init_console(tmp_path: Path) -> None:
    keys = host_keys(tmp_path)
    expected = [fingerprint(public) for public, _ in keys]
    assert [listed.split()[1] for _, listed in keys] == expected  # our hash is ssh-keygen's
    assert parse_fingerprints(console(keys)) == expected
    # Only the keys block left (an image that prints no fingerprint block): computed from it.
    only_keys = console(keys).split("<14>", 1)[0] + "-----BEGIN SSH HOST KEY KEYS-----\n"
    only_keys += "\n".join(public for public, _ in keys) + "\n-----END SSH HOST KEY KEYS-----\n"
    assert parse_fingerprints(only_keys) == expected


def test_fingerprints_cut_off_or_absent_are_none(tmp_path: Path) -> None:
    keys = host_keys(tmp_path)
    text = console(keys, with_keys_block=False)
    begin = text.index("-----BEGIN SSH HOST KEY FINGERPRINTS-----")
    # Nova returns the last 100 KiB: the block's first line scrolled away.
    assert parse_fingerprints(text[begin + 10 :]) == []
    # Read while cloud-init was still printing: no END line yet.
    assert parse_fingerprints(text[: text.index("-----END SSH HOST KEY")]) == []
    # The authorized-keys table of ci-info is never taken for host keys.
    assert parse_fingerprints(text[:begin]) == []


def test_the_last_block_counts(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = host_keys(tmp_path / "old"), host_keys(tmp_path / "new")
    text = console(old, with_keys_block=False) + console(new, with_keys_block=False)
    assert parse_fingerprints(text) == [fingerprint(public) for public, _ in new]


@pytest.mark.parametrize(
    ("code", "output", "outcome"),
    [
        (0, "Setting up sshfs (3.7.3-1.1build3) ...", AptOutcome.OK),
        (
            100,
            "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1372 "
            "(unattended-upgr)\nE: Unable to acquire the dpkg frontend lock "
            "(/var/lib/dpkg/lock-frontend), is another process using it?",
            AptOutcome.LOCKED,
        ),
        (
            100,
            "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 911 (apt-get)\n"
            "E: Unable to lock directory /var/lib/apt/lists/",
            AptOutcome.LOCKED,
        ),
        (100, "E: Unable to locate package sshfs", AptOutcome.STALE_LISTS),
        (
            100,
            "E: Package 'python3-venv' has no installation candidate",
            AptOutcome.STALE_LISTS,
        ),
        (
            100,
            "E: Failed to fetch http://archive.ubuntu.com/ubuntu/pool/main/s/sshfs-fuse/"
            "sshfs_3.7.3-1.1build3_amd64.deb  404  Not Found [IP: 185.125.190.36 80]\n"
            "E: Unable to fetch some archives, maybe run apt-get update or try with --fix-missing?",
            AptOutcome.STALE_LISTS,
        ),
        (
            100,
            "W: Failed to fetch http://archive.ubuntu.com/ubuntu/dists/noble/InRelease  "
            "Temporary failure resolving 'archive.ubuntu.com'\n"
            "E: Some index files failed to download. They have been ignored, or old ones used "
            "instead.",
            AptOutcome.TRANSIENT,
        ),
        (
            100,
            "E: Failed to fetch http://mirror/pool/main/f/fuse3/fuse3_3.14.0-5_amd64.deb  "
            "Hash Sum mismatch\n   Hashes of expected file:",
            AptOutcome.TRANSIENT,
        ),
        (
            100,
            "E: Failed to fetch http://mirror/dists/bookworm/InRelease  503  Service Unavailable",
            AptOutcome.TRANSIENT,
        ),
        (
            100,
            "Err:1 http://mirror bookworm InRelease\n  Could not connect to mirror:80 "
            "(10.0.0.1), connection timed out",
            AptOutcome.TRANSIENT,
        ),
        (
            100,
            "E: dpkg was interrupted, you must manually run 'sudo dpkg --configure -a' to "
            "correct the problem.",
            AptOutcome.INTERRUPTED,
        ),
        (
            100,
            "You might want to run 'apt --fix-broken install' to correct these.\n"
            "The following packages have unmet dependencies:\n"
            " libpython3.11-stdlib : Depends: libpython3.11-minimal (= 3.11.2-6+deb12u9) but "
            "3.11.2-6+deb12u8 is installed\n"
            "E: Unmet dependencies. Try 'apt --fix-broken install' with no packages (or "
            "specify a solution).",
            AptOutcome.BROKEN,
        ),
        (
            2,
            "dpkg: error: dpkg frontend lock was locked by another process with pid 4242\n"
            "Note: removing the lock file is always wrong, and can end up damaging the locked "
            "area\nand the entire system. See <https://wiki.debian.org/Teams/Dpkg/FAQ#db-lock>.",
            AptOutcome.LOCKED,
        ),
        (
            100,
            "The following packages have unmet dependencies:\n sshfs : Depends: fuse3 but it "
            "is not installable\nE: Unable to correct problems, you have held broken packages.",
            AptOutcome.FAILED,
        ),
        (100, "E: Sub-process /usr/bin/dpkg returned an error code (1)", AptOutcome.FAILED),
        (124, "", AptOutcome.TRANSIENT),
    ],
)
def test_apt_answers_are_classified(code: int, output: str, outcome: AptOutcome) -> None:
    assert classify_apt(code, output) == outcome


def test_package_decision() -> None:
    assert needed_packages(BootstrapConfig()) == ["python3-venv", "sshfs"]
    no_arc = BootstrapConfig.model_validate({"arc": {"enabled": False}})
    assert needed_packages(no_arc) == ["python3-venv"]
    on_pg = BootstrapConfig.model_validate({"prefect": {"database": {"kind": "postgresql"}}})
    assert needed_packages(on_pg) == ["python3-venv", "sshfs", "postgresql"]
    status = parse_dpkg_status(
        "sshfs\tii \npython3-venv\trc \nfuse3:amd64\tiU \nopenssh-server\tii \n"
    )
    assert status == {
        "sshfs": True,
        "python3-venv": False,
        "fuse3": False,
        "openssh-server": True,
    }
    assert missing_packages(["python3-venv", "sshfs"], status) == ["python3-venv"]
    # dpkg-query prints nothing for a package it never heard of: missing.
    assert missing_packages(["python3-venv", "sshfs"], parse_dpkg_status("")) == [
        "python3-venv",
        "sshfs",
    ]
    assert missing_packages(["sshfs"], {"sshfs": True}) == []
    now = 1_800_000_000
    assert lists_stale(0, 0, now)  # a fresh image: no lists at all
    assert lists_stale(3, now - 40 * 24 * 3600, now)  # the image build's lists
    assert not lists_stale(3, now - 3600, now)


@pytest.mark.parametrize(
    ("output", "state"),
    [
        ("\nstatus: done\nboot_status_code: enabled-by-generator\n", "done"),
        ("...........\nstatus: running\n", "running"),
        ("status: error\ndetail:\nDataSourceNone\nerrors:\n\t('ssh', ...)\n", "error"),
        (
            "status: done\nextended_status: degraded done\nboot_status_code: enabled\n",
            "error",
        ),
        ("status: disabled\n", "disabled"),
        ("", ""),
    ],
)
def test_cloud_init_status(output: str, state: str) -> None:
    assert cloud_init_state(output) == state


def test_a_missing_command_names_the_image_requirement(tmp_path: Path) -> None:
    assert missing_tool(127, "bash: line 1: python3: command not found\n") == "python3"
    assert missing_tool(127, "sh: 1: apt-get: not found\n") == "apt-get"
    assert missing_tool(127, "bash: /mnt/pspace/prefect-env/bin/python: No such file") is None
    assert missing_tool(1, "sh: 1: apt-get: not found") is None
    host = LocalHost()
    with pytest.raises(MissingToolError, match="no `sails-no-such-tool` command: the VM's image"):
        host.run("sails-no-such-tool --version", check=False)
    with pytest.raises(MissingToolError, match="must provide systemd as init"):
        host.run("PATH=/nonexistent systemctl is-active x")
    # A path that does not exist is the caller's question, not a missing tool.
    with pytest.raises(RemoteCommandError) as info:
        host.run(f"{tmp_path}/venv/bin/python -V")
    assert not isinstance(info.value, MissingToolError)
    assert host.run(f"{tmp_path}/venv/bin/python -V", check=False).code == 127


def test_booting_guest_errors_are_transient_and_the_arc_unit_gives_up() -> None:
    for code in (errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT):
        assert is_transient(OSError(code, "booting"))
    assert not is_transient(OSError(errno.EACCES, "denied"))
    # paramiko on the transport of a dropped connection: the retry opens a new one
    assert is_transient(OSError("Socket is closed"))
    assert is_transient(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    unit = unit_text(BootstrapConfig(), "someone")
    assert f"StartLimitBurst={START_LIMIT_BURST}" in unit
    assert "StartLimitIntervalSec=0" not in unit  # 0 would retry forever
    assert "Restart=always" in unit and "RestartSec=10" in unit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_port_that_opens_late_is_waited_for() -> None:
    port = _free_port()
    listener = socket.socket()

    def open_late() -> None:
        time.sleep(1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    opener = threading.Thread(target=open_late)
    opener.start()
    try:
        assert 0.9 < wait_for_port("127.0.0.1", port, timeout=20) < 15
    finally:
        opener.join()
        listener.close()


def test_a_port_that_stays_closed_names_what_to_check() -> None:
    port = _free_port()
    with pytest.raises(BootstrapError, match=r"did not accept connections within 0 s .*security"):
        wait_for_port("127.0.0.1", port, timeout=0)


def test_postgresql_is_installed_after_postgresql_common_is_told_to_make_no_main_cluster(
    tmp_path: Path,
) -> None:
    assert install_stages(["sshfs"]) == [(["sshfs"], None)]
    (first, command), rest = install_stages(["sshfs", "postgresql"])
    assert first == ["postgresql-common"] and command == NO_MAIN_CLUSTER
    assert rest == (["sshfs", "postgresql"], None)
    # the command in a copy of postgresql-common's folder: the shipped file stays as it is, the
    # setting is a file of its own in the folder that file includes
    etc = tmp_path / "postgresql-common"
    etc.mkdir()
    shipped = (
        "#create_main_cluster = true\nssl = on\n"
        "include_dir '/etc/postgresql-common/createcluster.d'\n"
    )
    conf = etc / "createcluster.conf"
    conf.write_text(shipped.replace("/etc/postgresql-common", str(etc)))
    script = NO_MAIN_CLUSTER.replace("/etc/postgresql-common", str(etc))
    assert "/etc/" not in script
    for _ in range(2):  # a second run changes nothing
        subprocess.run(["sh", "-c", script], check=True)
        assert conf.read_text() == shipped.replace("/etc/postgresql-common", str(etc))
        assert (
            (etc / "createcluster.d" / "50-sails.conf")
            .read_text()
            .endswith("\ncreate_main_cluster = false\n")
        )
        assert sorted(p.name for p in (etc / "createcluster.d").iterdir()) == ["50-sails.conf"]
    if shutil.which("pg_conftool"):  # (postgresql-common on this machine: its reading checked)
        conf.write_text("#create_main_cluster = true\n")  # a file that includes nothing
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
        assert r.returncode == 1 and "does not read" in r.stderr, r.stderr
