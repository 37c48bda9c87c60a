"""The sandbox cloud's tables: the schema sync of each service (the commands it runs) and the
processes each service starts. Nothing runs (subprocess.run is replaced): no sandbox, no root.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandbox.cloud import common as c
from sandbox.cloud import launch, schemas


class Ran:
    """The commands run, and what ``nova-manage cell_v2 list_cells`` prints."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.cells = "| cell0 | 00000000 |\n"

    def run(self, argv: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, stdout=self.cells, stderr="")


@pytest.fixture
def ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ran:
    for attr in ("STATE", "LOGS", "ETC"):
        monkeypatch.setattr(c, attr, tmp_path / attr.lower())
    recorder = Ran()
    monkeypatch.setattr(subprocess, "run", recorder.run)
    return recorder


def _manage(script: str, conf: str, *args: str) -> list[str]:
    """A setup command of a service other than keystone: run with nice."""
    return ["nice", "-n", "10", str(c.VENV_BIN / script), "--config-file", conf, *args]


def test_each_service_with_processes_has_a_schema_sync_keystone_first() -> None:
    assert list(schemas.SYNCS) == ["keystone", *launch.SERVICE_PROCS]


def test_each_service_process_is_an_api_or_a_daemon() -> None:
    started = [name for names in launch.SERVICE_PROCS.values() for name in names]
    assert sorted(started) == sorted((set(launch.APIS) - {"keystone"}) | set(launch.DAEMONS))
    assert all(service_type in c.ENDPOINTS for service_type, *_ in launch.APIS.values())


@pytest.mark.parametrize(
    ("service", "conf", "script", "args"),
    [
        ("placement", "placement.conf", "placement-manage", ["db", "sync"]),
        ("glance", "glance-api.conf", "glance-manage", ["db_sync"]),
        ("neutron", "neutron.conf", "neutron-db-manage", ["upgrade", "heads"]),
        ("cinder", "cinder.conf", "cinder-manage", ["db", "sync"]),
    ],
)
def test_a_one_command_sync_runs_once(
    ran: Ran, service: str, conf: str, script: str, args: list[str]
) -> None:
    schemas.db_sync(service)
    schemas.db_sync(service)  # the marker says it is done
    assert ran.calls == [_manage(script, str(c.ETC / service / conf), *args)]


def test_keystone_sets_up_its_keys_and_bootstraps_without_nice(ran: Ran) -> None:
    schemas.db_sync("keystone")
    conf = str(c.ETC / "keystone" / "keystone.conf")
    km = [str(c.VENV_BIN / "keystone-manage"), "--config-file", conf]
    assert [argv[: len(km) + 1] for argv in ran.calls] == [
        [*km, "db_sync"],
        [*km, "fernet_setup"],
        [*km, "credential_setup"],
        [*km, "bootstrap"],
    ]
    bootstrap = ran.calls[-1]
    assert bootstrap[bootstrap.index("--bootstrap-public-url") + 1] == c.public_url("identity")


@pytest.mark.parametrize(("cells", "creates"), [("| cell0 |\n", True), ("| cell1 | x |\n", False)])
def test_nova_creates_cell1_only_when_missing(ran: Ran, cells: str, creates: bool) -> None:
    ran.cells = cells
    schemas.db_sync("nova")
    conf = str(c.ETC / "nova" / "nova.conf")
    create = [_manage("nova-manage", conf, "cell_v2", "create_cell", "--name", "cell1")]
    assert ran.calls == [
        _manage("nova-manage", conf, "api_db", "sync"),
        _manage(
            "nova-manage",
            conf,
            "cell_v2",
            "map_cell0",
            "--database_connection",
            c.db_url("nova_cell0"),
        ),
        [str(c.VENV_BIN / "nova-manage"), "--config-file", conf, "cell_v2", "list_cells"],
        *(create if creates else []),
        _manage("nova-manage", conf, "db", "sync"),
    ]
