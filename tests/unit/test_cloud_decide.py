"""The cloud steps' decisions, as tables of (desired, observed) → action: pure functions, no
cloud. The sandbox tests prove the same steps against the real services."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from core.records import Action, ServerRecord
from tasks.cloud.floating_ip import bound_to_server, decide_floating_ip
from tasks.cloud.keypair import decide_keypair
from tasks.cloud.secgroup import decide_rules
from tasks.cloud.server import decide_server
from tasks.cloud.snapshot import decide_snapshots
from tasks.cloud.volume import decide_volume

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperator operator@laptop"


@pytest.mark.parametrize(
    ("existing", "action"),
    [
        (None, Action.CREATE),
        (KEY, Action.KEEP),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperator other-comment", Action.KEEP),
    ],
    ids=["missing", "same", "same key, other comment"],
)
def test_keypair(existing: str | None, action: Action) -> None:
    assert decide_keypair(existing, KEY) == action


def test_keypair_holding_another_key_is_refused_not_replaced() -> None:
    with pytest.raises(ValueError):
        decide_keypair("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStranger x", KEY)


SSH = ("IPv4", "tcp", 22, 22, "0.0.0.0/0")
SSH_NARROW = ("IPv4", "tcp", 22, 22, "203.0.113.0/24")
UI = ("IPv4", "tcp", 4200, 4200, "0.0.0.0/0")
ICMP = ("IPv4", "icmp", None, None, "0.0.0.0/0")


@pytest.mark.parametrize(
    ("wanted", "have", "missing", "extra", "action", "reason"),
    [
        ([SSH, UI, ICMP], [], [SSH, UI, ICMP], [], Action.CHANGE, "add tcp/22 from 0.0.0.0/0"),
        ([SSH, UI, ICMP], [ICMP, UI, SSH], [], [], Action.KEEP, "all rules as configured"),
        ([SSH, UI], [SSH, UI, UI], [], [], Action.KEEP, "all rules as configured"),
        ([SSH_NARROW, UI], [SSH, UI], [SSH_NARROW], [SSH], Action.CHANGE, "remove tcp/22"),
        ([SSH], [SSH, ICMP], [], [ICMP], Action.CHANGE, "remove icmp from 0.0.0.0/0"),
    ],
    ids=["empty group", "same, other order", "duplicate in cloud", "narrowed CIDR", "dropped"],
)
def test_rules(wanted, have, missing, extra, action, reason) -> None:
    decision = decide_rules(wanted, have)
    assert decision.missing == missing and decision.extra == extra
    assert decision.action(group_exists=True) == action
    assert reason in decision.reason()
    assert decision.action(group_exists=False) == Action.CREATE


def ip(id: str, port: str | None = None) -> NS:
    return NS(id=id, port_id=port, floating_ip_address=f"198.51.100.{id}")


@pytest.mark.parametrize(
    ("on_port", "ours", "action", "use", "release"),
    [
        (None, [], Action.CREATE, None, []),
        (None, [ip("1")], Action.CHANGE, "1", []),
        (None, [ip("1"), ip("2")], Action.CHANGE, "1", ["2"]),
        (None, [ip("1", port="other")], Action.CREATE, None, []),
        (ip("1", "p"), [ip("1", "p")], Action.KEEP, "1", []),
        (ip("1", "p"), [ip("1", "p"), ip("2"), ip("3", "q")], Action.KEEP, "1", ["2"]),
    ],
    ids=[
        "none: allocate",
        "a free one of ours: reuse",
        "two free: reuse the oldest, release the other",
        "ours but bound elsewhere: allocate",
        "on the port: keep",
        "on the port, a spare: release only the free one",
    ],
)
def test_floating_ip(on_port, ours, action, use, release) -> None:
    decision = decide_floating_ip(on_port, ours)
    assert decision.action == action
    assert (decision.use.id if decision.use else None) == use
    assert [f.id for f in decision.release] == release


@pytest.mark.parametrize(
    ("listed", "ours", "found"),
    [
        ([], [ip("1", "p")], None),
        (["198.51.100.1"], [ip("1", "p")], "1"),
        (["198.51.100.1"], [ip("1")], None),
        (["198.51.100.9"], [ip("1", "p")], None),
    ],
    ids=[
        "Nova lists no floating address: look at the port",
        "ours, bound, listed on the server: kept without a read",
        "ours but unbound (Nova's list lags): look at the port",
        "another address on the server (not ours): look at the port",
    ],
)
def test_floating_ip_seen_on_the_server(listed, ours, found) -> None:
    server = ServerRecord(name="vm", id="s", floating_ips=listed)
    hit = bound_to_server(server, ours)
    assert (hit.id if hit else None) == found


GROUP = "env-access"


def srv(id: str, status: str = "ACTIVE", groups: tuple[str, ...] = (GROUP,)) -> NS:
    return NS(id=id, status=status, security_groups=[{"name": g} for g in groups])


@pytest.mark.parametrize(
    ("servers", "action", "keep", "delete", "start", "join"),
    [
        ([], Action.CREATE, None, [], False, False),
        ([srv("a")], Action.KEEP, "a", [], False, False),
        ([srv("a", "BUILD")], Action.KEEP, "a", [], False, False),
        ([srv("a", "BUILD", groups=())], Action.KEEP, "a", [], False, False),
        ([srv("a", "SHUTOFF")], Action.CHANGE, "a", [], True, False),
        ([srv("a", groups=("default",))], Action.CHANGE, "a", [], False, True),
        ([srv("a"), srv("b")], Action.KEEP, "a", ["b"], False, False),
        ([srv("a", "ERROR")], Action.CREATE, None, ["a"], False, False),
        ([srv("a", "ERROR"), srv("b")], Action.KEEP, "b", ["a"], False, False),
    ],
    ids=[
        "none: create",
        "active",
        "building: keep (and wait)",
        "building, no groups listed yet: judged once ACTIVE",
        "shutoff: start",
        "made before the group: join",
        "a duplicate: the oldest kept",
        "in ERROR: replace",
        "ERROR and a good one: keep the good one",
    ],
)
def test_server(servers, action, keep, delete, start, join) -> None:
    decision = decide_server(servers, GROUP)
    assert decision.action == action
    assert (decision.keep.id if decision.keep else None) == keep
    assert [s.id for s in decision.delete] == delete
    assert (decision.start, decision.join_group) == (start, join)
    assert decision.replacing == (keep is None and bool(delete))


def vol(id: str, status: str = "available", size: int = 50) -> NS:
    return NS(id=id, status=status, size=size, name="env-data", created_at="t", attachments=[])


@pytest.mark.parametrize(
    ("volumes", "action", "reason"),
    [
        ([], Action.CREATE, "missing"),
        ([vol("a")], Action.KEEP, "available, 50 GB"),
        ([vol("a", size=20)], Action.KEEP, "smaller than the 50 GB asked; not resized"),
        ([vol("a", "deleting")], Action.CREATE, "missing"),
        ([vol("a", "deleting"), vol("b", "in-use")], Action.KEEP, "in-use, 50 GB"),
        ([vol("a"), vol("b")], Action.BLOCKED, "never deleted for you"),
    ],
    ids=["none", "one", "smaller", "being deleted", "one being deleted, one live", "two"],
)
def test_volume(volumes, action, reason) -> None:
    got, why, _ = decide_volume(volumes, 50)
    assert got == action and reason in why


@pytest.mark.parametrize(
    ("names", "keep", "take", "drop"),
    [
        ([], 2, True, []),
        (["a"], 2, True, []),
        (["a", "b"], 2, True, ["a"]),
        (["a", "b", "c"], 2, True, ["a", "b"]),
        (["a", "new"], 2, False, []),
        (["a", "b", "new"], 2, False, ["a"]),
        (["a"], 1, True, ["a"]),
    ],
    ids=[
        "none yet: take",
        "under the count: take, delete nothing",
        "at the count: take, the oldest goes",
        "over the count (keep lowered): the two oldest go",
        "taken already by a retried request: not again",
        "taken already, one too many: the oldest goes",
        "keep 1: only the new one stays",
    ],
)
def test_snapshots(names, keep, take, drop) -> None:
    assert decide_snapshots(names, "new", keep) == (take, drop)
