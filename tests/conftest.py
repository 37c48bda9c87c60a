"""Test-wide settings and fixtures.

Every external part (the Prefect server, the sandbox cloud, the CANFAR stand-ins) is real and is
started by the fixtures themselves.
"""

from __future__ import annotations

import os
import tempfile

# Before Prefect is imported anywhere: no telemetry, a private home for the test session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sails-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)

pytest_plugins = [
    "tests.fixtures.prefect_server",
    "tests.fixtures.cloud",
    "tests.fixtures.guests",
    "tests.fixtures.canfar",
    "tests.fixtures.bootstrap",
]
