"""A run killed at any step boundary converges when run again, with nothing duplicated and the
data on the volume untouched.

The environment starts with a volume holding data and no server (an operator's teardown, or a
lost VM). ``sails-bootstrap up`` then runs as a separate process and is killed (SIGKILL to its
process group) right after its n-th task run completes, for n = 1, 3, 5, ... (every boundary
with ``SAILS_CRASH_STRIDE=1``). Each run repeats the finished steps as no-ops and reaches further,
so the kill points cover the bootstrap from its first step to its last. After each kill the cloud's admin listings show at most one server, floating IP
and volume; at the end the volume's filesystem and the data file are the ones made before.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from core.config import dump_config
from flows.bootstrap import bootstrap
from flows.teardown import teardown
from tasks.access import vm_for
from tasks.cloud import open_connection
from tasks.cloud.locate import locate_vm
from tests.fixtures.bootstrap import kill_cli, start_cli
from tests.fixtures.cloud import ours

pytestmark = [pytest.mark.sandbox]

DATA = "/mnt/pspace/precious.bin"
#: Kill after every STRIDE-th task run (1: every boundary; make test uses every second one).
STRIDE = int(os.environ.get("SAILS_CRASH_STRIDE", "2"))


#: The line the task engine logs once a task run's final state is set, in the process itself.
FINISHED = re.compile(rb"Task run '[^']+' - Finished in state Completed\(\)")


class TaskRunWatch:
    """Counts the task runs a CLI process reports completed, reading its log lines as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self.done = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._cond:
                self.tail.append(line.decode(errors="replace").rstrip())
                if FINISHED.search(line):
                    self.done += 1
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> int:
        """Block until n task runs completed or the process's output ended; the count so far."""
        with self._cond:
            self._cond.wait_for(lambda: self.done >= n or self._eof, timeout)
            return self.done

    @property
    def ended(self) -> bool:
        """The process closed its output: it is exiting by itself."""
        with self._cond:
            return self._eof

    def close(self) -> int:
        """Wait for the rest of the output (the process has exited or been killed); the count."""
        self._reader.join(timeout=30)
        self._stream.close()
        return self.done

    def log_tail(self) -> str:
        with self._cond:
            return "\n".join(self.tail)


def fingerprint(cfg: Any) -> tuple[str, str]:
    """(filesystem UUID of the mounted volume, sha256 of the data file), read on the VM."""
    vm = vm_for(cfg, locate_vm(open_connection(cfg), cfg))
    try:
        uuid = vm.run("findmnt -n -o UUID --mountpoint /mnt/pspace").stdout.strip()
        digest = vm.run(f"sha256sum {DATA}").stdout.split()[0]
    finally:
        vm.close()
    return uuid, digest


@pytest.mark.timeout(1800)
def test_up_killed_at_every_step_boundary_converges(
    vm_config: Any, prefect_server: Any, admin_conn: Any, tmp_path: Path
) -> None:
    cfg = vm_config("t-crash")
    bootstrap(cfg)
    vm = vm_for(cfg, locate_vm(open_connection(cfg), cfg))
    vm.run(f"head -c 4M /dev/urandom > {DATA}", sudo=True)
    vm.close()
    before = fingerprint(cfg)
    teardown(cfg)  # the server goes, the volume and its data stay

    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    kills: list[int] = []
    n = 1
    finished = False
    total = 0
    for _ in range(60):
        proc = start_cli("up", "--config", str(cfg_file), env=prefect_server.env(), logs=True)
        watch = TaskRunWatch(proc)
        done = watch.wait_for(n, timeout=300)
        if done < n and not watch.ended:
            kill_cli(proc)
            raise AssertionError(f"`up` stalled before task run {n}:\n{watch.log_tail()}")
        if done < n:  # `up` finished by itself
            assert proc.wait(timeout=60) == 0, (
                f"`up` failed by itself after the kills at {kills}:\n{watch.log_tail()}"
            )
            total = watch.close()
            finished = True
            break
        kill_cli(proc)
        kills.append(watch.close())
        world = ours(admin_conn, cfg)
        assert [len(world[k]) <= 1 for k in ("servers", "fips", "volumes")] == [True] * 3, (
            kills,
            world,
        )
        n = kills[-1] + STRIDE
    assert finished, f"`up` never completed; killed after {kills} task runs"
    # Each run is killed only past the previous kill point, so the points rise by construction;
    # what is checked is that they start at the first boundaries and cover the run to its end.
    # (A kill can land a boundary late where concurrent steps finish together.)
    assert kills[0] <= 2, kills
    assert kills[-1] >= total - 2 - STRIDE and len(kills) >= total // (2 * STRIDE), (kills, total)

    bootstrap(cfg)  # and once more in this process: converged
    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1], world
    assert fingerprint(cfg) == before  # never formatted again, data unchanged
