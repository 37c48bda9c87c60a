"""The probe runner: every probe at once, each bounded by its own limit, in the caller's context."""

from __future__ import annotations

import threading
import time

from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.health import FAIL, OK, Probe, run_probes


def test_a_hung_probe_is_reported_at_its_limit_and_the_others_still_answer() -> None:
    release = threading.Event()

    def hangs() -> tuple[str, str]:
        release.wait(60)
        return OK, "late"

    def raises() -> tuple[str, str]:
        raise OSError("no route to host")

    t0 = time.monotonic()
    try:
        results = run_probes(
            [
                Probe("hung", hangs, 1.0),
                Probe("broken", raises, 5),
                Probe("fine", lambda: (OK, "answered"), 5),
            ]
        )
    finally:
        release.set()
    took = time.monotonic() - t0
    by_name = {r.probe: r for r in results}
    assert [r.probe for r in results] == ["hung", "broken", "fine"]
    hung = by_name["hung"]
    assert (hung.status, hung.detail, hung.seconds) == (FAIL, "timeout: no answer within 1 s", 1.0)
    assert (by_name["broken"].status, by_name["broken"].detail) == (
        FAIL,
        "OSError: no route to host",
    )
    assert (by_name["fine"].status, by_name["fine"].detail) == (OK, "answered")
    assert took < 60  # it did not wait for the hung probe's thread (held 60 s)


def test_probes_see_the_callers_prefect_settings() -> None:
    """A probe that loads a block must reach the API the flow uses, not a temporary server."""
    url = "http://127.0.0.1:9/api"
    with temporary_settings({PREFECT_API_URL: url}):
        (result,) = run_probes([Probe("api", lambda: (OK, str(PREFECT_API_URL.value())), 5)])
    assert (result.status, result.detail) == (OK, url)
