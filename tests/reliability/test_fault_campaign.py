"""Fault campaign: 10 % of the product's cloud calls fail (5xx, 429 with Retry-After, dropped
connections), seeded so a failing run can be replayed. Every run of the bootstrap converges, and
teardown under the same faults leaves nothing behind in the cloud's own admin listings.

``make test`` runs two seeds; a longer campaign: ``SAILS_CAMPAIGN_RUNS=20 pytest tests/reliability``
(seeds 1..N) or ``SAILS_CAMPAIGN_SEEDS=7,11`` to replay particular runs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from flows.bootstrap import bootstrap
from flows.provision import provision
from flows.teardown import teardown
from tasks.records import Action
from tests.fixtures.cloud import ours

pytestmark = [pytest.mark.sandbox]

FAULTS = ["503", "502", "500", "429", "drop"]
RATE = 0.1
#: openstacksdk's app_name in the product's connections: the campaign hits the product only,
#: not the cloud's own services talking to each other.
AGENT = "^sails-bootstrap"


def seeds() -> list[int]:
    if os.environ.get("SAILS_CAMPAIGN_SEEDS"):
        return [int(s) for s in os.environ["SAILS_CAMPAIGN_SEEDS"].split(",")]
    return list(range(1, int(os.environ.get("SAILS_CAMPAIGN_RUNS", "2")) + 1))


def product_faults(fault_control: Any) -> int:
    return sum(sum(kinds.values()) for kinds in fault_control.counts()["faults"].values())


@pytest.mark.parametrize("seed", seeds())
def test_bootstrap_converges_under_faults_and_leaks_nothing(
    seed: int, vm_config: Any, fault_control: Any, admin_conn: Any
) -> None:
    cfg = vm_config(f"t-fault-{seed}")
    fault_control.configure(
        "*", fail_rate=RATE, faults=FAULTS, retry_after=1, user_agent=AGENT, seed=seed
    )
    out = bootstrap(cfg)
    assert out["api_url"].endswith(":4200/api")
    injected = product_faults(fault_control)
    assert injected > 0, fault_control.counts()  # the campaign did hit the run

    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1], world
    assert world["servers"][0].status == "ACTIVE"
    assert world["volumes"][0].status == "in-use"

    # Converged means nothing left to change, even with the faults still on.
    again = provision(cfg, plan=True)
    changes = [r for r in again.records if r.action != Action.KEEP]
    assert not changes, [r.row() for r in changes]

    records = teardown(cfg, delete_data_volume=True)
    assert {r.kind for r in records} >= {"server", "floating ip", "volume"}, records
    fault_control.clear()
    assert ours(admin_conn, cfg) == {"servers": [], "fips": [], "volumes": []}
