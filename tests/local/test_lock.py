"""One run at a time per environment: a second run waits for the first, or refuses past its
bound naming the holder; a killed holder frees the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOLD = """
import sys, time
from sails_bootstrap.lock import environment_lock
with environment_lock("alma", "up"):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""

TAKE = """
import sys, time
from sails_bootstrap.lock import LockHeld, environment_lock
began = time.monotonic()
try:
    with environment_lock("alma", "provision", wait=float(sys.argv[1])):
        print(f"got it after {time.monotonic() - began:.1f} s")
except LockHeld as exc:
    print(f"refused: {exc}")
"""


def python(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def held(env: dict[str, str], seconds: float) -> subprocess.Popen[str]:
    proc = python(HOLD, str(seconds), env=env)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_second_run_waits_then_runs_and_a_bound_refuses(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    first = held(env, 3)
    refused = python(TAKE, "0", env=env).communicate(timeout=60)[0]
    assert refused.startswith("refused: environment 'alma' is in use"), refused
    assert f"pid {first.pid}, `up`" in refused, refused
    out, err = python(TAKE, "30", env=env).communicate(timeout=60)
    assert out.startswith("got it after"), out
    assert float(out.split()[3]) >= 1, out  # it waited for the first run to end
    assert "waiting for another run of 'alma' to end" in err, err
    assert first.wait(timeout=30) == 0
    lock = tmp_path / "sails-bootstrap" / "alma.lock"
    assert oct(lock.stat().st_mode & 0o777) == "0o600"


def test_a_killed_run_frees_the_environment(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    first = held(env, 600)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    began = time.monotonic()
    out = python(TAKE, "0", env=env).communicate(timeout=60)[0]
    assert out.startswith("got it after"), out
    assert time.monotonic() - began < 30


def test_the_vm_lock_spans_holders_and_a_dead_one_frees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's own lock (what an SSH session from the operator's machine and the VM's own
    deployments both hold): a second holder waits, then refuses naming the first; a holder
    whose process dies frees it at once."""
    from core.errors import LockHeldOnVM
    from tasks.vm import LocalHost
    from tasks.vm_lock import lock_script

    vm = LocalHost()
    vm.lock_dir = str(tmp_path)
    with vm.exclusive("alma", "`configure` from laptop", wait=5):
        began = time.monotonic()
        with pytest.raises(LockHeldOnVM) as info, vm.exclusive("alma", "`remount`", wait=1):
            pass
        assert 1 <= time.monotonic() - began < 5
        assert "`configure` from laptop" in str(info.value)
    with vm.exclusive("alma", "`remount`", wait=0):  # released at the end of the block
        pass

    # A holder killed outright (its SSH connection gone, its run killed): free again.
    holder = subprocess.Popen(
        ["sh", "-c", lock_script("`up` killed later", 0, str(tmp_path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockHeldOnVM, match="killed later"), vm.exclusive("alma", "x", wait=0):
        pass
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    with vm.exclusive("alma", "`remount`", wait=2):
        pass
