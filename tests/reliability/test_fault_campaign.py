"""Fault campaign: 10 % of the product's cloud calls fail (5xx, 429 with Retry-After, dropped
connections), and the VM has a bad first boot: its sshd comes up late, unattended-upgrades holds
the dpkg lock, the package mirror fails some requests and answers slowly, and an SSH connection
is dropped in the middle of a command. Seeded, so a failing run can be replayed. Every run of
the bootstrap converges, and teardown under the same faults leaves nothing behind in the cloud's
own admin listings.

``make test`` runs one seed (its VM-side faults make each run a whole first boot); a longer
campaign: ``SAILS_CAMPAIGN_RUNS=20 pytest tests/reliability``
(seeds 1..N) or ``SAILS_CAMPAIGN_SEEDS=7,11`` to replay particular runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from core.records import Action
from flows.bootstrap import bootstrap
from flows.provision import provision
from flows.teardown import teardown
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
    return list(range(1, int(os.environ.get("SAILS_CAMPAIGN_RUNS", "1")) + 1))


def product_faults(fault_control: Any) -> int:
    return sum(sum(kinds.values()) for kinds in fault_control.counts()["faults"].values())


@dataclass
class VMFaults:
    """The VM side of one seeded run, drawn from the seed."""

    sshd_delay: float
    dpkg_lock_seconds: float
    mirror_fail_rate: float
    mirror_delay: float
    drop_after: float  # seconds after the product's first SSH session opens
    dropped: list[int] = field(default_factory=list)  # sessions reset, per drop

    @classmethod
    def draw(cls, seed: int) -> VMFaults:
        rng = random.Random(seed)
        return cls(
            sshd_delay=rng.choice([10.0, 20.0, 30.0]),
            dpkg_lock_seconds=rng.choice([20.0, 40.0]),
            mirror_fail_rate=rng.choice([0.1, 0.2]),
            mirror_delay=rng.choice([0.05, 0.2]),
            drop_after=rng.uniform(5.0, 20.0),
        )


def _ssh_sessions(name: str) -> int:
    import subprocess

    from sandbox.guests import firewall

    ns = firewall.netns(name)
    if ns is None:
        return 0
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-t", "-n", "-H", "state", "established",
         "( sport = :22 )"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return len([line for line in out.splitlines() if line.strip()])


@contextlib.contextmanager
def vm_faults(faults: VMFaults, server_name: str, admin_conn: Any) -> Iterator[VMFaults]:
    """Set the VM-side faults for guests made from now on, and drop the product's SSH
    connection once, ``drop_after`` seconds into its first session."""
    from sandbox import latency, mirror
    from sandbox.guests import firewall

    stop = threading.Event()

    def dropper() -> None:
        name = None
        while not stop.wait(1):
            if name is None:
                servers = [
                    s for s in admin_conn.compute.servers(all_projects=True)
                    if s.name == server_name
                ]  # fmt: skip
                name = firewall.guest_of_server(servers[0].id) if servers else None
                continue
            if _ssh_sessions(name):
                break
        if stop.wait(faults.drop_after):
            return
        while not stop.wait(0.5):  # the next moment a session is open: a command in flight
            if name and _ssh_sessions(name):
                faults.dropped.append(firewall.drop_ssh_connections(name))
                return

    saved_latency = {k: latency.get(k) for k in ("sshd_delay",)}
    latency.set_latency(**{**_all_latency(), "sshd_delay": faults.sshd_delay})
    thread = threading.Thread(target=dropper, daemon=True)
    with mirror.fault(
        fail_rate=faults.mirror_fail_rate,
        delay=faults.mirror_delay,
        dpkg_lock_seconds=faults.dpkg_lock_seconds,
    ):
        thread.start()
        try:
            yield faults
        finally:
            stop.set()
            thread.join(30)
            latency.set_latency(**{**_all_latency(), **saved_latency})


def _all_latency() -> dict[str, float]:
    import json

    from sandbox import latency

    try:
        return {k: float(v) for k, v in json.loads(latency.PATH.read_text()).items() if v}
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("seed", seeds())
def test_bootstrap_converges_under_faults_and_leaks_nothing(
    seed: int, vm_config: Any, fault_control: Any, admin_conn: Any
) -> None:
    cfg = vm_config(f"t-fault-{seed}")
    fault_control.configure(
        "*", fail_rate=RATE, faults=FAULTS, retry_after=1, user_agent=AGENT, seed=seed
    )
    t0 = time.monotonic()
    with vm_faults(VMFaults.draw(seed), cfg.server_name, admin_conn) as vm:
        out = bootstrap(cfg)
    assert out["api_url"] == f"{cfg.ui_url}/api"  # through the alias's forward
    injected = product_faults(fault_control)
    assert injected > 0, fault_control.counts()  # the campaign did hit the run
    assert vm.dropped and vm.dropped[0] > 0, f"no SSH session was dropped ({vm})"
    print(f"seed {seed}: {vm}, {injected} cloud faults, {time.monotonic() - t0:.0f} s")

    world = ours(admin_conn, cfg)
    assert [len(world[k]) for k in ("servers", "fips", "volumes")] == [1, 1, 1], world
    assert world["servers"][0].status == "ACTIVE"
    assert world["volumes"][0].status == "in-use"

    # Converged means nothing left to change, even with the faults still on.
    again = provision(cfg, plan=True)
    changes = [r for r in again.records if r.action != Action.KEEP]
    assert not changes, [r.row() for r in changes]

    # A delete whose answer a fault swallowed is done when its retry looks, so it may not be
    # in the records; the admin listings below are the proof that nothing is left.
    records = teardown(cfg, delete_data_volume=True)
    assert records and {r.action for r in records} == {Action.DELETE}, records
    fault_control.clear()
    assert ours(admin_conn, cfg) == {"servers": [], "fips": [], "volumes": []}
