"""Register's decisions, as tables of (desired, observed) → decision: pure functions, no
Prefect server, no VM. The sandbox tests prove the same steps against the real ones."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any
from uuid import uuid4

import pytest
from prefect.blocks.system import Secret
from pydantic import SecretStr

from blocks import CanfarCredentials, OpenStackCredentials
from core.prefect_settings import OWN_POOL, WorkPool
from tasks.canfar import VM_CA_BUNDLE
from tasks.deploy import automation_counts, decide_deployments
from tasks.register import decide_work_pools, for_vm
from tasks.vm_server import block_is_current
from tasks.workers import UnitState, decide_workers

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


OWN = WorkPool(name=OWN_POOL)
IDLE = WorkPool(name="idle", workers=0)
UP = UnitState(enabled=True, active=True)
DOWN = UnitState(enabled=True, active=False)
OFF = UnitState(enabled=False, active=False)
RUNNING_DISABLED = UnitState(enabled=False, active=True)


@pytest.mark.parametrize(
    ("pools", "units", "changed", "notes", "restart"),
    [
        ([MONITOR, OWN], {"monitor": UP, OWN_POOL: UP}, "", [], []),
        ([MONITOR], {"monitor": OFF}, "", ["enabled monitor", "started monitor"], []),
        ([MONITOR], {"monitor": RUNNING_DISABLED}, "", ["enabled monitor"], []),
        ([MONITOR], {"monitor": DOWN}, "", ["started monitor"], []),
        ([MONITOR, OWN], {"monitor": UP, OWN_POOL: UP}, "env", [], ["monitor", OWN_POOL]),
        ([MONITOR, OWN], {"monitor": UP, OWN_POOL: UP}, "unit", [], ["monitor", OWN_POOL]),
        ([MONITOR, OWN], {"monitor": UP, OWN_POOL: UP}, "own", [], [OWN_POOL]),
        ([MONITOR, OWN], {"monitor": DOWN, OWN_POOL: UP}, "unit", ["started monitor"], [OWN_POOL]),
        ([MONITOR], {"monitor": RUNNING_DISABLED}, "env", ["enabled monitor"], ["monitor"]),
        (
            [OWN, MONITOR],
            {OWN_POOL: OFF, "monitor": OFF},
            "",
            [f"enabled {OWN_POOL}", f"started {OWN_POOL}", "enabled monitor", "started monitor"],
            [],
        ),
        ([IDLE, MONITOR], {"idle": OFF, "monitor": UP}, "unit", [], ["monitor"]),
        ([IDLE], {"idle": OFF}, "", [], []),
        ([IDLE], {"idle": UP}, "", [], []),
        ([IDLE], {"idle": RUNNING_DISABLED}, "env", [], []),
    ],
    ids=[
        "enabled and running",
        "disabled and stopped: enable and start",
        "running but disabled: enable only",
        "stopped: start",
        "environment changed: restart the running ones",
        "unit changed: restart the running ones",
        "own pool's venv changed: restart its worker alone",
        "unit changed, one stopped: start it, restart the other",
        "disabled, running, environment changed: enable and restart",
        "two down: notes in the config's order",
        "a pool with workers=0: no unit of its own",
        "only a pool with workers=0, its unit off: nothing",
        "workers=0, its unit running: stopped, not restarted",
        "workers=0, running but disabled: stopped",
    ],
)
def test_workers(pools, units, changed, notes, restart) -> None:
    decision = decide_workers(
        pools, units, changed == "env", changed == "unit", own_changed=changed == "own"
    )
    assert decision.notes == notes
    assert decision.enable == [n.split()[1] for n in notes if n.startswith("enabled ")]
    assert decision.start == [n.split()[1] for n in notes if n.startswith("started ")]
    assert decision.restart == restart
    idle = [p.name for p in pools if p.workers == 0]
    assert decision.stop == [n for n in idle if units[n].enabled or units[n].active]


V = "sails-0123456789abcdef"
OLD = "sails-fedcba9876543210"
WANTED = {"health": 0, "repair": 1}  # name: triggers in prefect.yaml


@pytest.mark.parametrize(
    ("ours", "runs", "kept"),
    [
        ([("health", V, "h"), ("repair", V, "r")], {"r": 1}, True),
        ([], {}, False),
        ([("health", V, "h")], {}, False),
        ([("health", V, "h"), ("repair", OLD, "r")], {"r": 1}, False),
        ([("health", V, "h"), ("repair", None, "r")], {"r": 1}, False),
        ([("health", V, "h"), ("repair", V, "r")], {}, False),
        ([("health", V, "h"), ("repair", V, "r")], {"old-r": 1}, False),
        ([("health", V, "h"), ("repair", V, "r")], {"r": 2}, False),
        ([("health", V, "h"), ("repair", V, "r")], {"r": 1, "h": 1}, False),
        ([("health", V, "h"), ("repair", V, "r"), ("teardown", V, "t")], {"r": 1}, False),
        ([("health", V, "h"), ("repair", V, "r"), ("teardown", OLD, "t")], {"r": 1}, False),
    ],
    ids=[
        "all at this version, their automations there",
        "none deployed",
        "one missing",
        "one at another version",
        "one with no version",
        "a missing automation",
        "the automation runs an older deployment of the name",
        "an automation twice",
        "an automation for a deployment with no trigger",
        "an extra deployment of ours not wanted",
        "an extra one of ours at another version",
    ],
)
def test_deployments(ours, runs, kept) -> None:
    reason = decide_deployments(ours, runs, WANTED, V)
    assert reason == (f"health, repair as deployed ({V})" if kept else None)


def automation(*deployments: str | None) -> NS:
    return NS(
        actions=[NS(deployment_id=d) if d else NS(type="send-notification") for d in deployments]
    )


@pytest.mark.parametrize(
    ("automations", "counts"),
    [
        ([], {}),
        ([automation("r")], {"r": 1}),
        ([automation("r"), automation("r")], {"r": 2}),
        ([automation("r", "r")], {"r": 1}),
        ([automation("r", "h"), automation(None)], {"r": 1, "h": 1}),
    ],
    ids=[
        "none",
        "one",
        "two for one deployment",
        "one with two actions on it: counted once",
        "one for two, one running none",
    ],
)
def test_automation_counts(automations, counts) -> None:
    assert automation_counts(automations) == counts


CANFAR = CanfarCredentials(username="me", password=SecretStr("pw"))
CHECKSUM = CanfarCredentials._calculate_schema_checksum()


def loaded(block: Any) -> Any:
    """The block as ``load`` returns it: with its local document's id and name."""
    block = block.model_copy()
    block._block_document_id, block._block_document_name = uuid4(), "local"
    return block


def doc(data: dict[str, Any], checksum: str | None = CHECKSUM) -> NS:
    """A block document as the server answers it (secrets included)."""
    return NS(data=data, block_schema=NS(checksum=checksum) if checksum else None)


@pytest.mark.parametrize(
    ("document", "block", "current"),
    [
        (None, CANFAR, False),
        (doc({"username": "me", "password": "pw"}), CANFAR, True),
        (doc({"username": "me", "password": "pw"}), loaded(CANFAR), True),
        (doc({"username": "me", "password": "old"}), CANFAR, False),
        (doc({"username": "me", "password": "pw", "days_valid": 7}), CANFAR, False),
        (doc({"username": "me", "password": "pw"}, checksum="sha256:other"), CANFAR, False),
        (doc({"username": "me", "password": "pw"}, checksum=None), CANFAR, False),
        (
            doc({"value": "s3cret"}, Secret._calculate_schema_checksum()),
            Secret(value=SecretStr("s3cret")),
            True,
        ),
    ],
    ids=[
        "none under the name: save",
        "the same fields: keep",
        "a loaded block (its local id aside): keep",
        "a secret differing: save",
        "a field differing: save",
        "saved with another schema: save",
        "no schema: save",
        "a Secret, the same: keep",
    ],
)
def test_block_is_current(document, block, current) -> None:
    assert block_is_current(document, block) == current


OPENSTACK = OpenStackCredentials(
    auth_url="https://keystone.example:5000/v3",
    application_credential_id="id",
    application_credential_secret=SecretStr("s"),
)


@pytest.mark.parametrize(
    ("block", "field", "on_vm"),
    [
        (OPENSTACK.model_copy(update={"cacert": "/home/me/ca.pem"}), "cacert", VM_CA_BUNDLE),
        (OPENSTACK, "cacert", None),
        (CANFAR.model_copy(update={"ca_bundle": "/home/me/ca.pem"}), "ca_bundle", VM_CA_BUNDLE),
        (CANFAR, "ca_bundle", None),
        (Secret(value=SecretStr("s")), "value", SecretStr("s")),
    ],
    ids=[
        "a cloud CA file: the VM's bundle",
        "cloud, no CA file: as it is",
        "a CANFAR CA file: the VM's bundle",
        "CANFAR, no CA file: as it is",
        "a Secret: as it is",
    ],
)
def test_block_for_vm(block, field, on_vm) -> None:
    moved = for_vm(block)
    assert getattr(moved, field) == on_vm
    assert {f: getattr(moved, f) for f in type(block).model_fields if f != field} == {
        f: getattr(block, f) for f in type(block).model_fields if f != field
    }
