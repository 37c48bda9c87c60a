"""Fault and latency proxy in front of the sandbox cloud's public endpoints.

The server side: ``FaultProxy`` forwards each service's port to its upstream and applies the
rules (see ``sandbox.faults`` for the rule fields); ``main`` is the process entry point
(``python -m sandbox.faults``), ``server_argv`` its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import ssl
from collections import defaultdict
from typing import Any

from sandbox.faults.wire import (
    HOP_BY_HOP,
    REASONS,
    WRITE_METHODS,
    ProtocolError,
    _header,
    _read_body,
    _read_head,
    read_request,
)


class FaultProxy:
    def __init__(
        self,
        upstreams: dict[str, tuple[int, int]],
        hosts: list[str] | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.upstreams = upstreams  # service -> (listen port, upstream port)
        self.hosts = hosts or ["127.0.0.1"]
        #: The public endpoints speak TLS when given a context (the upstreams stay plain HTTP on
        #: loopback, as behind a real cloud's TLS-terminating load balancer).
        self.tls = tls
        self.host = self.hosts[0]  # the control API listens here only
        self.rules: dict[str, dict[str, Any]] = {}
        self.seed = 0
        self.rng = random.Random(0)
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.paths: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.faults_sent: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        # first word of the User-Agent (openstacksdk's app_name) -> service -> "METHOD path" -> n
        self.agents: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )

    # rules -------------------------------------------------------------------------------------
    def rule_for(self, service: str) -> dict[str, Any]:
        return self.rules.get(service) or self.rules.get("*") or {}

    def set_rules(self, body: dict[str, Any], merge: bool) -> None:
        rules = body.get("rules", {})
        for rule in rules.values():
            for pd in rule.get("path_delays", []):
                re.compile(pd.get("path", ""))
            if rule.get("path"):
                re.compile(rule["path"])
        if merge:
            for service, rule in rules.items():
                self.rules.setdefault(service, {}).update(rule)
        else:
            self.rules = {k: dict(v) for k, v in rules.items()}
        if "seed" in body:
            self.seed = int(body["seed"])
            self.rng = random.Random(self.seed)

    def reset(self) -> None:
        self.rules = {}
        self.rng = random.Random(self.seed)
        self.counts.clear()
        self.paths.clear()
        self.faults_sent.clear()
        self.agents.clear()

    def _delay(self, rule: dict[str, Any], method: str, path: str) -> float:
        delay = float(rule.get("delay", 0.0))
        delay += float(rule.get("method_delay", {}).get(method, 0.0))
        for pd in rule.get("path_delays", []):
            if pd.get("method", method).upper() == method and re.search(pd["path"], path):
                delay += float(pd.get("delay", 0.0))
        return delay

    @staticmethod
    def _applies(rule: dict[str, Any], agent: str) -> bool:
        """A rule with ``user_agent`` only touches clients whose User-Agent matches it."""
        pattern = rule.get("user_agent")
        return not pattern or re.search(pattern, agent) is not None

    def _fault(self, rule: dict[str, Any], method: str, path: str) -> str | None:
        methods = rule.get("methods")
        if methods and method not in [m.upper() for m in methods]:
            return None
        if rule.get("path") and not re.search(rule["path"], path):
            return None
        kinds = rule.get("faults") or ["503"]
        if int(rule.get("fail_next", 0)) > 0:
            rule["fail_next"] = int(rule["fail_next"]) - 1
            return str(self.rng.choice(kinds))
        rate = float(rule.get("fail_rate", 0.0))
        if rate > 0 and self.rng.random() < rate:
            return str(self.rng.choice(kinds))
        return None

    # proxying ----------------------------------------------------------------------------------
    async def handle(
        self, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while (request := await read_request(reader)) is not None:
                method, target, headers, body = (
                    request.method,
                    request.target,
                    request.headers,
                    request.body,
                )
                path = request.path
                self.counts[service][method] += 1
                self.paths[service][f"{method} {path}"] += 1
                agent = _header(headers, "user-agent") or ""
                self.agents[agent.split(" ", 1)[0]][service][f"{method} {path}"] += 1
                rule = self.rule_for(service)
                if not self._applies(rule, agent):
                    rule = {}
                delay = self._delay(rule, method, path)
                fault = self._fault(rule, method, path)
                if delay > 0:
                    await asyncio.sleep(delay)
                if fault is not None:
                    self.faults_sent[service][fault] += 1
                if fault == "drop":
                    writer.transport.abort()
                    return
                if fault is not None:
                    status, out_headers, out_body = self._fault_response(int(fault), rule)
                else:
                    status, out_headers, out_body = await self._forward(
                        service, method, target, headers, body
                    )
                keep = (_header(headers, "connection") or "").lower() != "close"
                self._write_response(writer, method, status, out_headers, out_body, keep)
                await writer.drain()
                if not keep:
                    break
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _fault_response(self, status: int, rule: dict[str, Any]) -> tuple[str, list, bytes]:
        reason = REASONS.get(status, "Error")
        body = json.dumps(
            {"error": {"code": status, "title": reason, "message": f"sandbox fault: {reason}"}}
        ).encode()
        headers = [("Content-Type", "application/json")]
        if status in (429, 503):
            headers.append(("Retry-After", str(rule.get("retry_after", 1))))
        return f"{status} {reason}", headers, body

    async def _forward(
        self, service: str, method: str, target: str, headers: list, body: bytes
    ) -> tuple[str, list, bytes]:
        upstream_port = self.upstreams[service][1]
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, upstream_port)
        except OSError:
            body = b'{"error": {"code": 502, "message": "sandbox: service not running"}}'
            return "502 Bad Gateway", [("Content-Type", "application/json")], body
        try:
            lines = [f"{method} {target} HTTP/1.1"]
            lines += [
                f"{k}: {v}"
                for k, v in headers
                if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-forwarded-")
            ]
            # The services build the links they return from this (oslo_middleware's
            # http_proxy_to_wsgi), so their version documents name https URLs.
            lines += [f"X-Forwarded-Proto: {'https' if self.tls else 'http'}"]
            lines += [f"Content-Length: {len(body)}"] if body or method in WRITE_METHODS else []
            lines += ["Connection: close", "", ""]
            up_writer.write("\r\n".join(lines).encode("latin-1") + body)
            await up_writer.drain()
            head = await _read_head(up_reader)
            if head is None:
                raise ConnectionError("upstream closed")
            status_line, resp_headers = head
            status = status_line.split(" ", 1)[1]
            code = int(status.split(" ")[0])
            if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
                resp_body = b""
            else:
                resp_body = await _read_body(up_reader, resp_headers, until_eof=True)
            return status, resp_headers, resp_body
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()

    @staticmethod
    def _write_response(
        writer: asyncio.StreamWriter,
        method: str,
        status: str,
        headers: list,
        body: bytes,
        keep: bool,
    ) -> None:
        lines = [f"HTTP/1.1 {status}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP]
        code = int(status.split(" ")[0])
        if not (code in (204, 304) or 100 <= code < 200):
            length = len(body)
            if method == "HEAD":
                length = int(_header(headers, "content-length") or 0)
            lines.append(f"Content-Length: {length}")
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n")
        if method != "HEAD":
            writer.write(body)

    # control API -------------------------------------------------------------------------------
    def snapshot_counts(self) -> dict[str, Any]:
        return {
            "counts": {s: dict(m) for s, m in self.counts.items()},
            "paths": {s: dict(p) for s, p in self.paths.items()},
            "faults": {s: dict(f) for s, f in self.faults_sent.items()},
            "agents": {a: {s: dict(p) for s, p in sv.items()} for a, sv in self.agents.items()},
        }

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request is None:
                return
            method, path, body = request.method, request.path, request.body
            code, payload = 200, {}
            try:
                if path == "/_faults" and method == "GET":
                    payload = {"seed": self.seed, "rules": self.rules}
                elif path == "/_faults" and method in ("PUT", "PATCH"):
                    self.set_rules(json.loads(body or b"{}"), merge=method == "PATCH")
                    payload = {"seed": self.seed, "rules": self.rules}
                elif path == "/_counts" and method == "GET":
                    payload = self.snapshot_counts()
                elif path == "/_reset" and method == "POST":
                    self.reset()
                    payload = {"reset": True}
                elif path == "/_health":
                    payload = {"ok": True, "services": self.upstreams}
                else:
                    code, payload = 404, {"error": f"no {method} {path}"}
            except (ValueError, re.error) as exc:
                code, payload = 400, {"error": str(exc)}
            out = json.dumps(payload).encode()
            self._write_response(
                writer,
                method,
                f"{code} {'OK' if code == 200 else 'Error'}",
                [("Content-Type", "application/json")],
                out,
                keep=False,
            )
            await writer.drain()
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def serve(self, ctl_port: int) -> None:
        servers = []
        for service, (listen, _) in self.upstreams.items():
            for host in self.hosts:
                servers.append(
                    await asyncio.start_server(
                        lambda r, w, s=service: self.handle(s, r, w),
                        host,
                        listen,
                        reuse_address=True,
                        limit=1 << 20,
                        ssl=self.tls,
                    )
                )
        servers.append(
            await asyncio.start_server(self.control, self.host, ctl_port, reuse_address=True)
        )
        print(f"fault proxy: {self.upstreams}, control on {ctl_port}", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))


def server_argv(
    python: str,
    upstreams: dict[str, tuple[int, int]],
    ctl_port: int,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    tls: tuple[str, str] | None = None,
) -> list[str]:
    """Command line that runs the proxy with ``python`` (which must be able to import sandbox);
    ``tls`` is (certificate file, key file) for the public listeners."""
    argv = [python, "-m", "sandbox.faults", "--ctl-port", str(ctl_port)]
    if tls:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    for host in hosts:
        argv += ["--host", host]
    for service, (listen, upstream) in upstreams.items():
        argv += ["--route", f"{service}={listen}:{upstream}"]
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctl-port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[], help="service=listen:upstream")
    parser.add_argument("--host", action="append", default=[], help="address to listen on")
    parser.add_argument("--tls-cert", help="PEM certificate of the public listeners")
    parser.add_argument("--tls-key", help="PEM key of the public listeners")
    args = parser.parse_args(argv)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    upstreams = {}
    for route in args.route:
        service, _, ports = route.partition("=")
        listen, _, upstream = ports.partition(":")
        upstreams[service] = (int(listen), int(upstream))
    asyncio.run(FaultProxy(upstreams, args.host or None, tls).serve(args.ctl_port))
