"""The smoke test's program names a failure the way an operator can act on it."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from tasks.session_probe import cause


class Swallowed(Exception):
    """What the canfar client raises with the HTTP errors it collected (``errors``)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__("request failed")
        self.errors = {"create": NS(response=NS(status_code=status, text=text))}


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (Swallowed(401, "Unauthorized"), "auth: HTTP 401: Unauthorized"),
        (RuntimeError("certificate has expired"), "auth: certificate has expired"),
        (Swallowed(400, "image not found: images.canfar.net/x"), "image: HTTP 400: image"),
        (Swallowed(400, "Invalid value for 'cores': 64"), "quota: HTTP 400: Invalid value"),
        (RuntimeError("has reached the maximum of 3 active sessions"), "quota: has reached"),
        (RuntimeError("connection reset"), "connection reset"),
    ],
    ids=["401", "expired certificate", "missing image", "past the offer", "session cap", "other"],
)
def test_causes(exc: BaseException, said: str) -> None:
    assert cause(exc).startswith(said)
