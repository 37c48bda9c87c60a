"""A run killed at any step boundary converges when run again, with nothing duplicated and the
data on the volume untouched.

The environment starts with a volume holding data and no server (an operator's teardown, or a
lost VM). ``sails-bootstrap up`` then runs as a separate process and is killed (SIGKILL to its
process group) right after its n-th task run completes, for n = 1, 2, ... Each run repeats the
finished steps as no-ops and reaches one step further, so every boundary of the bootstrap is a
kill point once. After each kill the cloud's admin listings show at most one server, floating IP
and volume; at the end the volume's filesystem and the data file are the ones made before.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from flows.bootstrap import bootstrap
from flows.configure import vm_for
from flows.teardown import teardown
from sails_bootstrap.config import dump_config
from tasks.cloud import locate_vm, open_connection
from tests.fixtures.bootstrap import kill_cli, start_cli
from tests.fixtures.cloud import ours

pytestmark = [pytest.mark.sandbox]

DATA = "/mnt/pspace/precious.bin"


def completed_task_runs(after: dt.datetime) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterStartTime,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                start_time=TaskRunFilterStartTime(after_=after),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED])),
            )
        )
    return len(runs)


def fingerprint(cfg: Any) -> tuple[str, str]:
    """(filesystem UUID of the mounted volume, sha256 of the data file), read on the VM."""
    vm = vm_for(cfg, locate_vm.fn(open_connection(cfg), cfg))
    try:
        uuid = vm.run("findmnt -n -o UUID --mountpoint /mnt/pspace").stdout.strip()
        digest = vm.run(f"sha256sum {DATA}").stdout.split()[0]
    finally:
        vm.close()
    return uuid, digest


def test_up_killed_at_every_step_boundary_converges(
    vm_config: Any, prefect_server: Any, admin_conn: Any, tmp_path: Path
) -> None:
    cfg = vm_config("t-crash")
    bootstrap(cfg)
    vm = vm_for(cfg, locate_vm.fn(open_connection(cfg), cfg))
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
        start = dt.datetime.now(dt.UTC)
        proc = start_cli("up", "--config", str(cfg_file), env=prefect_server.env())
        done = 0
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = completed_task_runs(start)
            if done >= n:
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            assert proc.returncode == 0, f"`up` failed by itself after the kills at {kills}"
            total = completed_task_runs(start)
            finished = True
            break
        kill_cli(proc)
        kills.append(done)
        world = ours(admin_conn, cfg)
        assert [len(world[k]) <= 1 for k in ("servers", "fips", "volumes")] == [True] * 3, (
            kills,
            world,
        )
        n = done + 1
    assert finished, f"`up` never completed; killed after {kills} task runs"
    # Kill points walk through the whole run: strictly later each time, the last one near the
    # end. (Polling can land a few boundaries late where no-op steps finish close together.)
    assert kills == sorted(set(kills)) and kills[0] <= 2, kills
    assert kills[-1] >= total - 3 and len(kills) >= total // 2, (kills, total)

    bootstrap(cfg)  # and once more in this process: converged
    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1], world
    assert fingerprint(cfg) == before  # never formatted again, data unchanged
