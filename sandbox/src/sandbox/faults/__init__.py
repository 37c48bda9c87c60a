"""Fault and latency proxy in front of the sandbox cloud's public endpoints.

One process, one listening port per service (the ports in the Keystone catalog), forwarding
each request to the real service. Per-service rules inject what a real cloud does on a bad day:
500 / 503 / 429 (with Retry-After) answers and dropped connections at a given rate or for the
next N matching requests, fixed, per-method and per-path delays. A seeded RNG makes runs
repeat. Every request is counted by service, method and path, so a test can assert that a
read-only run sent zero writes.

Control API (loopback): ``GET/PUT/PATCH /_faults``, ``GET /_counts``, ``POST /_reset``;
``FaultControl`` is its client.

Modules: ``proxy`` (the server process, run as ``python -m sandbox.faults``), ``client``
(``FaultControl``), ``wire`` (HTTP/1.1 framing).

Rule fields (all optional), per service type or ``"*"`` for every service without its own rule::

    {"fail_rate": 0.2,                # probability that a matching request gets a fault
     "fail_next": 3,                  # the next 3 matching requests get a fault (then stops)
     "faults": ["503", "429", "500", "drop"],   # chosen at random (seeded) among these
     "retry_after": 1,                # seconds, sent with 429 and 503
     "methods": ["GET"], "path": "^/v2.1/servers",  # which requests faults apply to
     "user_agent": "my-bench",        # only clients whose User-Agent matches (app_name=...)
     "delay": 0.05,                   # seconds added to every request
     "method_delay": {"POST": 0.5},
     "path_delays": [{"method": "POST", "path": "/volumes$", "delay": 3.0}]}
"""

from __future__ import annotations

from sandbox.faults.client import FaultControl
from sandbox.faults.proxy import FaultProxy, main, server_argv

__all__ = ["FaultControl", "FaultProxy", "main", "server_argv"]
