"""Logging through Prefect's run logger, with a plain logger outside a run."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger


def logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("sails_bootstrap")


class Progress:
    """Logs a waiting message at most every ``every`` seconds, with the time spent so far."""

    def __init__(self, what: str, every: float = 10.0):
        self.what = what
        self.every = every
        self.start = time.monotonic()
        self._last = self.start - every

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def tick(self, state: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            logger().log(
                logging.INFO, "waiting for %s: %s (%.0f s)", self.what, state, self.elapsed
            )
