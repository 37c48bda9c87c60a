"""Register's decisions, as tables of (desired, observed) → decision: pure functions, no
Prefect server, no VM. The sandbox tests prove the same steps against the real ones."""

from __future__ import annotations

import pytest

from core.settings import WorkPool
from tasks.register import decide_work_pools

MONITOR = WorkPool(name="monitor")
VM_RUNS = WorkPool(name="vm-runs", concurrency=2)


@pytest.mark.parametrize(
    ("wanted", "listed", "notes"),
    [
        ([MONITOR, VM_RUNS], {"monitor": None, "vm-runs": 2}, []),
        ([MONITOR, VM_RUNS], {}, ["created monitor", "created vm-runs", "vm-runs limit None -> 2"]),
        ([MONITOR, VM_RUNS], {"vm-runs": 2}, ["created monitor"]),
        ([VM_RUNS], {"vm-runs": 5}, ["vm-runs limit 5 -> 2"]),
        ([VM_RUNS], {"vm-runs": None}, ["vm-runs limit None -> 2"]),
        ([MONITOR], {"monitor": 3}, ["monitor limit 3 -> None"]),
        ([MONITOR], {"monitor": 0}, ["monitor limit 0 -> None"]),
        ([VM_RUNS], {"vm-runs": 2, "someone-elses": 1}, []),
        ([], {"vm-runs": 2}, []),
    ],
    ids=[
        "as configured",
        "none there: create, then set the limits asked",
        "one missing: create it",
        "a limit differing",
        "a limit to set on an unlimited pool",
        "a limit to lift",
        "a limit of 0 is not None: lifted",
        "a pool not configured: left alone",
        "nothing configured",
    ],
)
def test_work_pools(wanted, listed, notes) -> None:
    changes = decide_work_pools(wanted, listed)
    assert [n for c in changes for n in c.notes()] == notes
    for c in changes:
        assert c.create == (c.name not in listed)
        assert c.set_limit == (c.limit != listed.get(c.name))
        assert c.limit == next(p.concurrency for p in wanted if p.name == c.name)
