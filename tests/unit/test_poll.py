"""The one wait loop: ready ends it, a bound ends it with the caller's error, a read may end it."""

from __future__ import annotations

import itertools

import pytest

from core.poll import poll


def test_returns_the_first_ready_value() -> None:
    values = iter(["BUILD", "BUILD", "ACTIVE", "never read"])
    assert poll(lambda: next(values), lambda v: v == "ACTIVE", "x", 5, interval=0) == "ACTIVE"
    assert next(values) == "never read"


def test_past_the_bound_the_callers_error_names_the_last_value() -> None:
    counter = itertools.count()
    with pytest.raises(LookupError, match=r"still \d+"):
        poll(
            lambda: next(counter),
            lambda _: False,
            "x",
            0.05,
            interval=0.02,
            timed_out=lambda last: LookupError(f"still {last}"),
        )


def test_the_default_error_is_a_timeout_with_the_state() -> None:
    with pytest.raises(TimeoutError, match="waiting thing: still SHUTOFF after 0 s"):
        poll(lambda: 1, lambda _: False, "waiting thing", 0, interval=0, state=lambda _: "SHUTOFF")


def test_a_read_that_raises_ends_the_wait() -> None:
    def read() -> int:
        raise RuntimeError("went to ERROR")

    with pytest.raises(RuntimeError, match="ERROR"):
        poll(read, lambda _: True, "x", 60)


def test_a_short_first_wait_doubles_up_to_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("core.poll.time.sleep", slept.append)
    values = iter(range(6))
    assert poll(lambda: next(values), lambda v: v == 5, "x", 60, interval=1, first=0.25) == 5
    assert slept == [0.25, 0.5, 1, 1, 1]
