"""First-boot steps against real processes: apt held off its channel, venvs missing, broken and
working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.packages import (
    off_the_channel,
)
from tasks.venvs import venv_probe
from tasks.vm import LocalHost


def test_apt_off_the_channel_outlives_its_reader(tmp_path: Path) -> None:
    """What a dropped SSH session does to a command: its output pipe closes. Written to the
    channel, the next write kills it (SIGPIPE, as apt and dpkg mid-unpack); written to a file
    it runs to its end. Its output and exit code still come back when the reader stays."""
    command = "sleep 1; echo unpacking; echo unpacked >> {marker}; exit 3"

    def cut_off(cmd: str) -> None:
        p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()  # the channel is gone
        p.stderr.close()
        p.wait(timeout=30)

    plain, detached = tmp_path / "plain", tmp_path / "detached"
    cut_off(command.format(marker=plain))
    cut_off(off_the_channel(command.format(marker=detached)))
    assert not plain.exists()  # killed by its first write
    assert detached.read_text() == "unpacked\n"
    r = LocalHost().run(off_the_channel("echo out; echo err >&2; exit 3"), check=False)
    assert (r.code, r.stdout) == (3, "out\nerr\n")


def test_venv_probe_tells_missing_broken_and_working(tmp_path: Path) -> None:
    host = LocalHost()
    venv = str(tmp_path / "prefect-env")
    code = "print('ok')"
    assert host.run(venv_probe(venv, code)).stdout.strip() == "missing"
    # What `python3 -m venv` leaves behind without ensurepip: bin/python and no pip.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    assert host.run(venv_probe(venv, code)).stdout.strip() == "broken"
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    assert host.run(venv_probe(venv, code)).stdout.strip() == "ok"
    # A python removed under the venv (an image upgrade): the link dangles, the venv is broken.
    (tmp_path / "prefect-env" / "bin" / "python").unlink()
    (tmp_path / "prefect-env" / "bin" / "python").symlink_to("/usr/bin/python3.0-gone")
    assert host.run(venv_probe(venv, code)).stdout.strip() == "broken"
