"""``write_file`` on this machine (``LocalHost``, the class the VM's own deployments use): content,
mode and owner are each compared, and a plan (``apply=False``) writes nothing."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from tasks.vm import LocalHost, same_attrs

ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_content_mode_and_owner_are_each_compared(tmp_path: Path) -> None:
    host = LocalHost()
    path = tmp_path / "etc" / "unit.conf"
    owner = f"{ME}:{MY_GROUP}"

    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False, apply=False)
    assert not path.exists()  # the plan wrote nothing
    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False)
    assert (path.read_text(), mode_of(path)) == ("a\n", 0o640)
    assert not host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False)

    path.chmod(0o666)  # same content, another mode: a change, planned then made
    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False, apply=False)
    assert mode_of(path) == 0o666
    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False)
    assert mode_of(path) == 0o640

    path.write_text("edited by hand\n")
    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False, apply=False)
    assert path.read_text() == "edited by hand\n"
    assert host.write_file(str(path), "a\n", mode="0640", owner=owner, sudo=False)
    assert path.read_text() == "a\n"


def test_an_empty_file_is_still_created(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    assert LocalHost().write_file(str(path), "", mode="0600", owner=ME, sudo=False)
    assert path.exists() and mode_of(path) == 0o600
    assert not LocalHost().write_file(str(path), "", mode="0600", owner=ME, sudo=False)


def test_stat_lines() -> None:
    assert same_attrs("644 root:root", "0644", "root")
    assert same_attrs("600 ubuntu:ubuntu", "0600", "ubuntu:ubuntu")
    assert not same_attrs("644 ubuntu:ubuntu", "0600", "ubuntu:ubuntu")
    assert not same_attrs("600 root:root", "0600", "ubuntu:ubuntu")
    assert not same_attrs("600 ubuntu:root", "0600", "ubuntu:ubuntu")
    assert not same_attrs("", "0644", "root")


def test_a_file_its_check_refuses_never_replaces_the_old_one(tmp_path: Path) -> None:
    """As a sudoers file is written: the new text takes the old one's place only once a check
    of the new file (visudo there, a grep here) accepts it."""
    import pytest

    from core.errors import RemoteCommandError

    host = LocalHost()
    path = tmp_path / "rules"
    owner = f"{ME}:{MY_GROUP}"
    kw = {"mode": "0440", "owner": owner, "sudo": False, "verify": "grep -q '^ok$'"}
    assert host.write_file(str(path), "ok\n", **kw)
    with pytest.raises(RemoteCommandError):
        host.write_file(str(path), "broken\n", **kw)
    assert (path.read_text(), mode_of(path)) == ("ok\n", 0o440)
    assert not list(tmp_path.glob("rules.new"))
