"""Client of the fault proxy's control API (``FaultControl``)."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from sandbox.faults.wire import WRITE_METHODS


class FaultControl:
    """Client of the proxy's control API.

    ``FaultControl().configure("compute", fail_next=2, faults=["503"])`` makes the next two
    compute requests answer 503; ``writes()`` is the number of POST/PUT/PATCH/DELETE requests
    seen since the last ``reset()``.
    """

    def __init__(self, url: str | None = None):
        if url is None:
            from sandbox.cloud import common

            url = f"http://{common.HOST}:{common.FAULTS_CTL_PORT}"
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def rules(self) -> dict[str, Any]:
        return self._call("GET", "/_faults")

    def configure(self, service: str = "*", *, seed: int | None = None, **rule: Any) -> dict:
        """Merge ``rule`` into the rule of ``service`` ("*" = every service without its own)."""
        body: dict[str, Any] = {"rules": {service: rule}}
        if seed is not None:
            body["seed"] = seed
        return self._call("PATCH", "/_faults", body)

    def replace(self, rules: dict[str, dict[str, Any]], seed: int | None = None) -> dict:
        body: dict[str, Any] = {"rules": rules}
        if seed is not None:
            body["seed"] = seed
        return self._call("PUT", "/_faults", body)

    def clear(self) -> dict:
        return self.replace({})

    def counts(self) -> dict[str, Any]:
        """``{"counts": {service: {method: n}}, "paths": {service: {"METHOD path": n}},
        "faults": {service: {kind: n}}, "agents": {user_agent_word: {service: {...}}}}``."""
        return self._call("GET", "/_counts")

    def writes(
        self,
        service: str | None = None,
        *,
        include_auth: bool = False,
        user_agent: str | None = None,
    ) -> int:
        """POST/PUT/PATCH/DELETE requests seen (token requests excluded unless asked).

        ``user_agent``: only requests whose User-Agent starts with that word (openstacksdk's
        ``app_name``), for a client sharing the sandbox with others.
        """
        counts = self.counts()
        paths = counts["paths"] if user_agent is None else counts["agents"].get(user_agent, {})
        services = [service] if service else list(paths)
        total = 0
        for svc in services:
            for key, n in paths.get(svc, {}).items():
                method, _, path = key.partition(" ")
                if method not in WRITE_METHODS:
                    continue
                if not include_auth and svc == "identity" and path.endswith("/auth/tokens"):
                    continue
                total += n
        return total

    def reset(self) -> None:
        """Forget every rule and every count."""
        self._call("POST", "/_reset")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/_health")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
