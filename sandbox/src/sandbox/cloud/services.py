"""Starting the sandbox cloud's processes in dependency order, and waiting for them; stopping
them.

Order: MariaDB + RabbitMQ + the fault proxy -> all schema syncs in parallel (keystone first to
finish, then keystone itself and the service accounts) -> every API and daemon -> nova-compute
mapped into cell1.

The pieces are modules of their own: ``infra`` (MariaDB, RabbitMQ), ``schemas`` (the schema
syncs), ``launch`` (the API and daemon tables and starting each process), ``hosts`` (nova-compute
and cinder-volume registered and reporting), ``probes`` (waiting, port and HTTP checks) and
``commands`` (one-shot setup commands); ``__all__`` lists what this module defines and what
it re-exports from them.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable

from sandbox.cloud import configs, procs
from sandbox.cloud.hosts import (
    compute_mapped,
    compute_node_present,
    compute_service_up,
    discover_hosts,
    volume_service_up,
)
from sandbox.cloud.infra import (
    DATABASES,
    INFRA,
    sql,
    start_mariadb,
    start_rabbitmq,
    stop_epmd,
    wait_mariadb,
    wait_rabbitmq,
)
from sandbox.cloud.launch import (
    APIS,
    DAEMONS,
    FAULTS,
    SERVICE_PROCS,
    api_ready,
    start_api,
    start_daemon,
    start_faults,
    start_process,
)
from sandbox.cloud.probes import http_answers, port_open, wait_for
from sandbox.cloud.schemas import db_sync

__all__ = [
    "ALL_PROCS",
    "APIS",
    "DAEMONS",
    "DATABASES",
    "FAULTS",
    "INFRA",
    "SERVICE_PROCS",
    "api_ready",
    "compute_mapped",
    "compute_node_present",
    "compute_service_up",
    "db_sync",
    "discover_hosts",
    "http_answers",
    "port_open",
    "sql",
    "start_all",
    "start_api",
    "start_daemon",
    "start_faults",
    "start_mariadb",
    "start_process",
    "start_rabbitmq",
    "stop_all",
    "stop_epmd",
    "stop_services",
    "volume_service_up",
    "wait_for",
    "wait_mariadb",
    "wait_rabbitmq",
]

ALL_PROCS = [*INFRA, FAULTS, *APIS, *DAEMONS]


def _log(msg: str) -> None:
    print(f"[sandbox.cloud] {msg}", flush=True)


def start_all(register_services: Callable[[], None]) -> None:
    """Bring every process up (idempotent) and wait until the cloud answers."""
    t0 = time.monotonic()
    configs.write_all()
    start_mariadb()
    start_rabbitmq()
    start_faults()
    wait_mariadb()
    _log(f"mariadb ready (+{time.monotonic() - t0:.0f} s)")

    keystone_ready = threading.Event()
    errors: list[BaseException] = []

    def keystone_chain() -> None:
        db_sync("keystone")
        start_api("keystone")
        wait_for("keystone", lambda: api_ready("keystone"), 90)
        register_services()
        _log(f"keystone ready, services registered (+{time.monotonic() - t0:.0f} s)")
        keystone_ready.set()

    def service_chain(service: str) -> None:
        db_sync(service)
        if service in ("nova", "neutron", "cinder"):
            wait_rabbitmq()
        keystone_ready.wait(180)
        if not keystone_ready.is_set():
            raise RuntimeError("keystone never became ready")
        for name in SERVICE_PROCS[service]:
            start_process(name)

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(keystone_chain)]
        futures += [pool.submit(service_chain, s) for s in SERVICE_PROCS]
        for fut in cf.as_completed(futures):
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
                keystone_ready.set()
    if errors:
        raise errors[0]
    _log(f"schemas in place, all processes started (+{time.monotonic() - t0:.0f} s)")
    for name in APIS:
        wait_for(name, lambda n=name: api_ready(n), 120)
    _log(f"APIs answer (+{time.monotonic() - t0:.0f} s)")
    discover_hosts()
    wait_for("nova-compute up", compute_service_up, 120, 0.5)
    wait_for("cinder-volume", volume_service_up, 120, 0.5)
    _log(f"nova-compute mapped, cinder-volume up (+{time.monotonic() - t0:.0f} s)")


def stop_services() -> None:
    """Every OpenStack process, leaving MariaDB, RabbitMQ and the proxy running."""
    procs.stop([*DAEMONS, *APIS], timeout=5.0)


def stop_all(timeout: float = 20.0) -> None:
    """Stop the services first, then the proxy, RabbitMQ and MariaDB.

    The services get a few seconds only: the databases are transactional and oslo.service
    daemons would otherwise wait for their RPC servers to drain.
    """
    stop_services()
    procs.stop([FAULTS, "rabbitmq"], timeout=timeout)
    procs.stop(["mariadb"], timeout=timeout)
    stop_epmd()
