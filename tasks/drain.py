"""Restarts that do not kill science runs: the pools are paused, the runs in flight in them are
waited for (up to ``prefect.drain_timeout``), the restart happens, the pools are resumed.

A worker's restart ends the flow runs it started (they are its child processes); a server's
restart leaves runs without their API for a while. Either is what an operator must not get from
a routine ``up``: a self-calibration can run for hours.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from tasks.log import Progress, logger

#: How often the runs in flight are read again while waiting.
POLL = 5.0


@dataclass
class Drain:
    """What a drain did: the pools it paused (and resumes), how long it waited, and the runs
    still in flight when its time box ended (the restart interrupts them)."""

    paused: list[str] = field(default_factory=list)
    waited_for: list[str] = field(default_factory=list)
    waited: float = 0.0
    interrupted: list[str] = field(default_factory=list)
    error: str | None = None

    def note(self) -> str:
        """A clause for a step's reason; empty when there was nothing to wait for."""
        if self.error:
            return f"runs in flight not checked ({self.error})"
        if self.interrupted:
            return (
                f"interrupted {len(self.interrupted)} run(s) still in flight after "
                f"{self.waited:.0f} s: {', '.join(self.interrupted)}"
            )
        if self.waited_for:
            return (
                f"waited {self.waited:.0f} s for {len(self.waited_for)} run(s) in flight "
                f"({', '.join(self.waited_for)})"
            )
        return ""


def _own_runs(client: Any) -> set[UUID]:
    """This flow run and the runs above it: a drain inside the VM's own `bootstrap` run must not
    wait for itself."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    own: set[UUID] = set()
    run = ctx.flow_run if ctx else None
    while run is not None and run.id not in own:
        own.add(run.id)
        parent = run.parent_task_run_id
        run = client.read_flow_run(client.read_task_run(parent).flow_run_id) if parent else None
    return own


def _in_flight(client: Any, pools: list[str], own: set[UUID]) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(
                    any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
                )
            )
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=pools)),
    )
    return [r for r in runs if r.id not in own]


@contextmanager
def drained(client: Any, pools: list[str], timeout: float, what: str) -> Iterator[Drain]:
    """Pause ``pools`` (those not paused already), wait for their runs in flight up to
    ``timeout`` seconds, yield for the restart of ``what``, resume the pools paused here (also
    when the restart fails). An API that does not answer has nothing to drain: the restart
    goes ahead and the record says the runs were not checked."""
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    drain = Drain()
    log = logger()
    try:
        own = _own_runs(client)
        present = []
        for name in pools:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                continue  # not registered yet: no runs
            present.append(name)
            if not pool.is_paused:
                client.update_work_pool(name, WorkPoolUpdate(is_paused=True))
                drain.paused.append(name)
        pools = present
        start = time.monotonic()
        progress = Progress(f"runs in flight before {what} restarts", every=30)
        while pools and (runs := _in_flight(client, pools, own)):
            drain.waited_for = sorted({*drain.waited_for, *(r.name for r in runs)})
            drain.waited = time.monotonic() - start
            if drain.waited >= timeout:
                drain.interrupted = sorted(r.name for r in runs)
                log.warning(
                    "%s restarts with %d run(s) still in flight after %.0f s "
                    "(prefect.drain_timeout): %s",
                    what,
                    len(runs),
                    drain.waited,
                    ", ".join(drain.interrupted),
                )
                break
            progress.tick(", ".join(f"{r.name} ({r.work_pool_name})" for r in runs))
            time.sleep(POLL)
        drain.waited = time.monotonic() - start
    except Exception as exc:  # the API down or refusing: nothing can be waited for
        drain.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("restart of %s: runs in flight not checked: %s", what, drain.error)
    try:
        yield drain
    finally:
        for name in drain.paused:
            try:
                client.update_work_pool(name, WorkPoolUpdate(is_paused=False))
            except Exception as exc:
                log.error("work pool %s stays paused: %s; resume it in the UI", name, exc)
