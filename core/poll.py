"""One wait loop for what no library waits for: read until ready, with progress and a bound."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from core.log import Progress

T = TypeVar("T")


def poll(
    read: Callable[[], T],
    ready: Callable[[T], bool],
    what: str,
    timeout: float,
    *,
    interval: float = 2.0,
    first: float | None = None,
    state: Callable[[T], str] = lambda _: "not yet",
    timed_out: Callable[[T], BaseException] | None = None,
) -> T:
    """``read()`` until ``ready`` says so, then its value. Between reads: a progress line
    ("waiting for WHAT: STATE (N s)") at most every 10 s, and ``interval`` seconds of sleep
    (``first``: the first sleep is that short, and each next one twice the last, up to
    ``interval``: a change that is usually quick is seen soon, a slow one is not read often).
    Past ``timeout``: ``timed_out(last value)`` is raised (a ``TimeoutError`` by default).
    ``read`` may raise to end the wait early (a resource gone to ERROR)."""
    progress = Progress(what)
    deadline = time.monotonic() + timeout
    pause = interval if first is None else min(first, interval)
    while True:
        value = read()
        if ready(value):
            return value
        if time.monotonic() > deadline:
            if timed_out is not None:
                raise timed_out(value)
            raise TimeoutError(f"{what}: still {state(value)} after {timeout:.0f} s")
        progress.tick(state(value))
        time.sleep(pause)
        pause = min(pause * 2, interval)
