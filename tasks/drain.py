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
from typing import TYPE_CHECKING, Any
from uuid import UUID

from core.log import Progress, logger

if TYPE_CHECKING:
    from tasks.vm import VM

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
    #: runs the server counts in flight whose process is not on the VM: not waited for
    gone: list[str] = field(default_factory=list)
    error: str | None = None

    def note(self) -> str:
        """A clause for a step's reason; empty when there was nothing to wait for."""
        if self.error:
            return f"runs in flight not checked ({self.error})"
        parts = []
        if self.interrupted:
            parts.append(
                f"interrupted {len(self.interrupted)} run(s) still in flight after "
                f"{self.waited:.0f} s: {', '.join(self.interrupted)}"
            )
        elif self.waited_for:
            parts.append(
                f"waited {self.waited:.0f} s for {len(self.waited_for)} run(s) in flight "
                f"({', '.join(self.waited_for)})"
            )
        if self.gone:
            parts.append(
                f"{len(self.gone)} run(s) the server counts in flight have no process on the "
                f"VM (set them Crashed in the UI): {', '.join(self.gone)}"
            )
        return "; ".join(parts)


def _own_runs() -> set[UUID]:
    """This flow run and the runs above it, read from the API this run reports to: a drain
    inside the VM's own `bootstrap` run must not wait for itself. (From the operator's machine
    these are runs of the local server, which the VM's server does not hold.)"""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    own: set[UUID] = set()
    run: Any = ctx.flow_run if ctx else None
    try:
        with get_client(sync_client=True) as client:
            while run is not None and run.id not in own:
                own.add(run.id)
                parent = run.parent_task_run_id
                above = client.read_task_run(parent).flow_run_id if parent else None
                run = client.read_flow_run(above) if above else None
    except Exception as exc:  # the ancestors are a refinement: the run itself is known
        logger().debug("parents of this run not read: %s", exc)
    return own


#: Flow-run ids of the processes running on the VM (the process worker gives each flow-run
#: process its id in the environment).
LIVE_RUNS = (
    "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"
    " | sed -n 's/^PREFECT__FLOW_RUN_ID=//p' | sort -u"
)
#: A pending run whose process has not appeared after this long is not coming.
PENDING_GRACE = 120.0


def _alive(runs: list[Any], host: VM | None) -> tuple[list[Any], list[Any]]:
    """(runs with a process on the VM or about to get one, runs left behind by a reboot or a
    killed worker: in flight for the server, gone from the VM)."""
    import datetime as dt

    from prefect.client.schemas.objects import StateType

    if host is None or not runs:
        return runs, []
    live = set(host.run(LIVE_RUNS, sudo=host.privileged, check=False).stdout.split())
    now = dt.datetime.now(dt.UTC)
    alive: list[Any] = []
    gone: list[Any] = []
    for run in runs:
        since = run.state.timestamp if run.state else None
        starting = run.state_type == StateType.PENDING and (
            since is None or (now - since).total_seconds() < PENDING_GRACE
        )
        (alive if str(run.id) in live or starting else gone).append(run)
    return alive, gone


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
def drained(
    client: Any, pools: list[str], timeout: float, what: str, host: VM | None = None
) -> Iterator[Drain]:
    """Pause ``pools`` (those not paused already), wait for their runs in flight up to
    ``timeout`` seconds, yield for the restart of ``what``, resume the pools paused here (also
    when the restart fails). With ``host`` (the VM), a run the server thinks in flight but
    whose process is gone from the VM (a reboot, a killed worker) is named, not waited for. An
    API that does not answer has nothing to drain: the restart goes ahead and the record says
    the runs were not checked."""
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    drain = Drain()
    log = logger()
    try:
        own = _own_runs()
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
        while pools:
            runs, gone = _alive(_in_flight(client, pools, own), host)
            # (a run that ended between the two reads is not left behind)
            gone = [r for r in gone if not client.read_flow_run(r.id).state.is_final()]
            drain.gone = sorted({*drain.gone, *(r.name for r in gone)})
            if not runs:
                break
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
            except ObjectNotFound:  # the server came back on another database (a switch)
                log.warning(
                    "work pool %s is not on %s since its restart (it runs on another "
                    "database now): `sails-bootstrap register` makes it again",
                    name,
                    what,
                )
            except Exception as exc:
                log.error("work pool %s stays paused: %s; resume it in the UI", name, exc)
