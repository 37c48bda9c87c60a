"""Provision's runner on a real Prefect server: converge hands it plain steps, and each becomes a
task run under its own name, started once what it waits for is done, its inputs handed over as
they are."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.unit.test_steps import CONVERGED


def test_converge_submits_each_step_as_a_task_run_of_its_name(
    prefect_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.runtime import task_run
    from prefect.task_runners import ThreadPoolTaskRunner

    from core.config import parse_config
    from flows.steps import WRAPPERS, submitted
    from tasks.cloud.converge import converge

    class Resource(dict):  # type: ignore[type-arg]
        """Stands for an observed SDK resource: a dict that builds new values on every read,
        which Prefect's walk would take for changes and rebuild."""

        def items(self) -> Any:
            return [(k, list(v)) for k, v in super().items()]

    conn, facts, key = (Resource(name=[n]) for n in ("conn", "facts", "key"))
    config = parse_config({"environment": "submitted"})
    ran: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def stand_in(name: str) -> Any:
        def step(*args: Any) -> str:
            began = time.monotonic()
            time.sleep(0.3 if name == "ensure-keypair" else 0.05)
            with lock:
                ran[name] = {
                    "task": task_run.task_name,
                    "args": args,
                    "began": began,
                    "ended": time.monotonic(),
                }
            return f"{name} done"

        return step

    for plain, wrapped in list(WRAPPERS.items()):
        if plain.__module__.startswith("tasks.cloud."):
            fake = task(name=wrapped.name, cache_policy=NO_CACHE)(stand_in(wrapped.name))
            monkeypatch.setitem(WRAPPERS, plain, fake)

    @flow(name="converge-submitted", task_runner=ThreadPoolTaskRunner(max_workers=8))  # type: ignore[arg-type]
    def run() -> Any:
        return converge(conn, config, key, facts, True, run=submitted)  # type: ignore[arg-type]

    cloud = run()
    assert sorted(ran) == sorted(CONVERGED)
    assert all(r["task"] == name for name, r in ran.items()), ran
    assert cloud.server == "ensure-server done" and cloud.attachment == "ensure-attachment done"
    # the inputs as they were (not copies), the other steps' results in place of their futures
    server_args = ran["ensure-server"]["args"]
    assert server_args[0] is conn and server_args[2] is facts
    assert server_args[-1] == "ensure-security-group done"
    assert ran["ensure-attachment"]["args"][2:4] == ("ensure-server done", "ensure-volume done")
    # the server waits for the keypair, which it takes no input from
    assert ran["ensure-server"]["began"] >= ran["ensure-keypair"]["ended"]
