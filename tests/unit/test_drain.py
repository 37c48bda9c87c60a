"""The drain around restarts, against a real Prefect server: pools paused while runs in flight
end, resumed after; the time box names what it interrupts; an unknown pool is nothing to wait
for. (The sandbox's operate test drains real workers on a real VM.)"""

from __future__ import annotations

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
