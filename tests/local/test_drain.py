"""The drain around restarts, against a real Prefect server: pools paused while runs in flight
end, resumed after; the time box names what it interrupts; an unknown pool is nothing to wait
for. (The sandbox's operate test drains real workers on a real VM.)"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.states import Completed, Running

from tasks import drain as drain_module
from tasks.drain import drained
from tasks.vm import LocalHost


@pytest.fixture
def client(prefect_server: Any) -> Any:
    with SyncPrefectClient(prefect_server.url) as c:
        yield c


def run_in_pool(client: Any, pool: str) -> Any:
    """A running flow run of a deployment in ``pool``."""
    flow_id = client.create_flow_from_name("science-stand-in")
    deployment = client.create_deployment(
        flow_id=flow_id, name=f"d-{uuid.uuid4().hex[:6]}", work_pool_name=pool
    )
    run = client.create_flow_run_from_deployment(deployment)
    client.set_flow_run_state(run.id, Running(), force=True)
    return client.read_flow_run(run.id)


def new_pool(client: Any) -> str:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    return name


def test_a_restart_waits_for_the_run_in_flight_with_its_pool_paused(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drain_module, "POLL", 0.2)
    pool, quiet = new_pool(client), new_pool(client)
    run = run_in_pool(client, pool)
    ends = threading.Timer(1.5, lambda: client.set_flow_run_state(run.id, Completed()))
    ends.start()
    start = time.monotonic()
    with drained(client, [pool, quiet, "not-registered"], 60, "the workers") as drain:
        waited = time.monotonic() - start
        assert client.read_work_pool(pool).is_paused and client.read_work_pool(quiet).is_paused
        assert client.read_flow_run(run.id).state.is_completed()
    ends.join()
    assert 1.0 < waited < 10
    assert drain.waited_for == [run.name] and drain.interrupted == []
    assert drain.note().startswith("waited ") and run.name in drain.note()
    assert not client.read_work_pool(pool).is_paused  # resumed
    assert not client.read_work_pool(quiet).is_paused


def test_the_time_box_names_the_runs_it_interrupts_and_keeps_a_pause_it_found(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate

    monkeypatch.setattr(drain_module, "POLL", 0.2)
    pool, paused_by_hand = new_pool(client), new_pool(client)
    client.update_work_pool(paused_by_hand, WorkPoolUpdate(is_paused=True))
    run = run_in_pool(client, pool)
    with (
        pytest.raises(RuntimeError, match="restart failed"),
        drained(client, [pool, paused_by_hand], 1, "the Prefect server") as drain,
    ):
        assert drain.interrupted == [run.name]
        raise RuntimeError("restart failed")
    assert drain.paused == [pool]
    assert "interrupted 1 run(s) still in flight" in drain.note()
    assert not client.read_work_pool(pool).is_paused  # resumed even so
    assert client.read_work_pool(paused_by_hand).is_paused  # the operator's pause stays


def test_an_api_that_does_not_answer_is_reported_not_waited_for() -> None:
    with (
        SyncPrefectClient("http://127.0.0.1:9/api") as dead,
        drained(dead, ["vm-runs"], 60, "the workers") as drain,
    ):
        pass
    assert drain.error and drain.note().startswith("runs in flight not checked")


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the environment of every process, as root")
def test_a_run_whose_process_is_gone_is_named_not_waited_for(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server counts a run in flight until someone says otherwise; after a reboot or a
    killed worker its process is gone for good. The drain waits while the run's process lives
    on the host (the process worker gives it its id in the environment), then names it."""
    monkeypatch.setattr(drain_module, "POLL", 0.2)
    pool = new_pool(client)
    run = run_in_pool(client, pool)
    process = subprocess.Popen(
        ["sleep", "2"], env={**os.environ, "PREFECT__FLOW_RUN_ID": str(run.id)}
    )
    start = time.monotonic()
    with drained(client, [pool], 60, "the workers", LocalHost()) as drain:
        waited = time.monotonic() - start
    process.wait()
    assert 1.5 < waited < 15, waited  # while its process lived, not up to the bound
    assert drain.waited_for == [run.name] and drain.gone == [run.name]
    assert "have no process on the VM" in drain.note() and run.name in drain.note()


def test_a_drain_inside_a_subflow_on_another_server_still_waits(
    client: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the operator's machine the drain runs inside `up`'s register subflow, whose runs
    are on the local server, while it reads the VM's server: its own runs are looked up where
    they are, and the drain still waits for the VM's run in flight."""
    from prefect import flow

    from sandbox.prefect_server import start_prefect_server, stop_prefect_server

    monkeypatch.setattr(drain_module, "POLL", 0.2)
    vm_server = start_prefect_server(tmp_path / "vm-server")
    try:
        with SyncPrefectClient(vm_server.url) as vm_client:
            pool = new_pool(vm_client)
            run = run_in_pool(vm_client, pool)

            @flow(name="register-stand-in")
            def child() -> Any:
                ends = threading.Timer(
                    1.0, lambda: vm_client.set_flow_run_state(run.id, Completed())
                )
                ends.start()
                with drained(vm_client, [pool], 60, "the workers") as drain:
                    pass
                ends.join()
                return drain

            @flow(name="up-stand-in")
            def parent() -> Any:
                return child()

            drain = parent()
    finally:
        stop_prefect_server(vm_server)
    assert drain.error is None, drain.error
    assert drain.waited_for == [run.name]
