# ruff: noqa: F811  (pytest fixtures imported from tests.fixtures.cloud)
"""The fault proxy: injected failures look like a real cloud's to openstacksdk/keystoneauth,
delays apply where asked, runs repeat with a seed, and the counters see every request."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request

import pytest
from keystoneauth1 import exceptions as ks_exceptions
from openstack import exceptions as sdk_exceptions

from tests.fixtures.cloud import connect, fault_control, sandbox_cloud  # noqa: F401

pytestmark = pytest.mark.sandbox


#: Rules below match this client only, so other users of a shared sandbox are not hit.
AGENT = "sails-fault-tests"


def user(**kwargs):
    conn = connect("sandbox", app_name=AGENT, **kwargs)
    list(conn.compute.flavors())  # token + version discovery before any fault is set
    return conn


def test_503_raises_without_retries_and_is_retried_with_them(fault_control):
    conn = user(status_code_retries=0)
    fault_control.configure(
        "compute", user_agent=AGENT, fail_next=1, faults=["503"], path="/flavors"
    )
    with pytest.raises(sdk_exceptions.HttpException) as err:
        list(conn.compute.flavors())
    assert err.value.status_code == 503

    retrying = user(status_code_retries=2)
    fault_control.configure("compute", user_agent=AGENT, fail_next=1, faults=["503"], retry_after=0)
    assert list(retrying.compute.flavors())
    assert fault_control.counts()["faults"]["compute"]["503"] == 2


def test_429_retry_after_is_honoured(fault_control):
    conn = user(status_code_retries=1)
    fault_control.configure("network", user_agent=AGENT, fail_next=1, faults=["429"], retry_after=2)
    t0 = time.monotonic()
    assert list(conn.network.networks()) is not None
    assert time.monotonic() - t0 >= 2.0
    assert fault_control.counts()["faults"]["network"]["429"] == 1

    plain = user()
    fault_control.configure("network", user_agent=AGENT, fail_next=1, faults=["429"])
    with pytest.raises(sdk_exceptions.HttpException) as err:
        list(plain.network.networks())
    assert err.value.status_code == 429


def test_dropped_connection(fault_control):
    conn = user(connect_retries=0)
    fault_control.configure("compute", user_agent=AGENT, fail_next=1, faults=["drop"])
    with pytest.raises((ks_exceptions.ConnectFailure, sdk_exceptions.SDKException)):
        list(conn.compute.servers())
    retrying = user(connect_retries=2)
    fault_control.configure("compute", user_agent=AGENT, fail_next=1, faults=["drop"])
    assert list(retrying.compute.servers()) is not None


def test_500_is_a_server_error(fault_control):
    conn = user(status_code_retries=3)
    list(conn.block_storage.volumes())
    fault_control.configure(
        "block-storage", user_agent=AGENT, fail_next=1, faults=["500"], path="/volumes"
    )
    with pytest.raises(sdk_exceptions.HttpException) as err:
        list(conn.block_storage.volumes())
    assert err.value.status_code == 500


def test_read_only_calls_make_no_writes(fault_control):
    conn = connect("sandbox", app_name=AGENT)
    conn.list_servers()
    conn.list_volumes()
    conn.list_networks()
    conn.list_images()
    conn.get_flavor("c1-7.5gb-36")
    conn.list_floating_ips()
    mine = fault_control.counts()["agents"][AGENT]
    assert sum(1 for k in mine["compute"] if k.startswith("GET ")) >= 2
    assert any(k.startswith("GET ") for k in mine["network"])
    assert fault_control.writes(user_agent=AGENT) == 0
    assert fault_control.writes(user_agent=AGENT, include_auth=True) >= 1  # the token request


def test_delays_per_method_and_path(fault_control):
    conn = user()
    fault_control.configure(
        "compute",
        user_agent=AGENT,
        path_delays=[{"method": "GET", "path": "/flavors/detail$", "delay": 1.5}],
    )
    t0 = time.monotonic()
    list(conn.compute.flavors())
    assert time.monotonic() - t0 >= 1.5
    t0 = time.monotonic()
    list(conn.compute.keypairs())
    assert time.monotonic() - t0 < 1.5
    fault_control.configure("compute", user_agent=AGENT, method_delay={"GET": 0.5}, path_delays=[])
    t0 = time.monotonic()
    list(conn.compute.keypairs())
    assert time.monotonic() - t0 >= 0.5


def _pattern(n: int = 20) -> list[int]:
    from sandbox import ca
    from sandbox.cloud import common

    tls = ssl.create_default_context(cafile=str(ca.ca_cert_path()))
    codes = []
    for _ in range(n):
        try:
            req = urllib.request.Request(common.AUTH_URL, headers={"User-Agent": AGENT})
            with urllib.request.urlopen(req, timeout=5, context=tls) as resp:
                codes.append(resp.status)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    return codes


def test_seeded_faults_repeat(fault_control):
    fault_control.configure(
        "identity", user_agent=AGENT, seed=42, fail_rate=0.5, faults=["500", "503"]
    )
    first = _pattern()
    fault_control.reset()
    fault_control.configure(
        "identity", user_agent=AGENT, seed=42, fail_rate=0.5, faults=["500", "503"]
    )
    second = _pattern()
    assert first == second
    assert {500, 503} & set(first) and 200 in first
    assert fault_control.counts()["agents"][AGENT]["identity"]["GET /v3"] == 20
