"""The services' database schemas: each service's sync, in the table ``SYNCS`` (keystone's
also sets up its keys and bootstraps the admin account and the identity endpoint; nova's also
maps cell0 and creates cell1), run once per set of pinned packages (a marker under
STATE_DIR/db-synced).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from sandbox.cloud import common as c
from sandbox.cloud import configs, packages
from sandbox.cloud.commands import run_setup, venv_bin


def _synced_marker(service: str):
    return c.STATE / "db-synced" / service


def _stamp() -> str:
    return "\n".join(packages.PINNED)


#: A service's schema sync, given the service's name and its config file.
Sync = Callable[[str, str], None]


def _keystone(service: str, conf: str) -> None:
    km = [venv_bin("keystone-manage"), "--config-file", conf]
    run_setup([*km, "db_sync"], service)
    run_setup([*km, "fernet_setup", "--keystone-user", "root", "--keystone-group", "root"], service)
    run_setup(
        [*km, "credential_setup", "--keystone-user", "root", "--keystone-group", "root"],
        service,
    )
    run_setup(
        [
            *km,
            "bootstrap",
            "--bootstrap-password",
            c.ADMIN_PASSWORD,
            "--bootstrap-username",
            c.ADMIN_USER,
            "--bootstrap-project-name",
            "admin",
            "--bootstrap-role-name",
            "admin",
            "--bootstrap-service-name",
            "keystone",
            "--bootstrap-region-id",
            c.REGION,
            "--bootstrap-public-url",
            c.public_url("identity"),
            "--bootstrap-internal-url",
            c.internal_url("identity"),
            "--bootstrap-admin-url",
            c.internal_url("identity"),
        ],
        service,
    )


def _nova(service: str, conf: str) -> None:
    nm = [venv_bin("nova-manage"), "--config-file", conf]
    run_setup([*nm, "api_db", "sync"], service)
    run_setup(
        [*nm, "cell_v2", "map_cell0", "--database_connection", c.db_url("nova_cell0")], service
    )
    cells = subprocess.run([*nm, "cell_v2", "list_cells"], capture_output=True, text=True)
    if " cell1 " not in cells.stdout:
        run_setup([*nm, "cell_v2", "create_cell", "--name", "cell1"], service)
    run_setup([*nm, "db", "sync"], service)


def _one_command(script: str, *args: str) -> Sync:
    """A sync that is one command: ``script --config-file <conf> args...``."""

    def sync(service: str, conf: str) -> None:
        run_setup([venv_bin(script), "--config-file", conf, *args], service)

    return sync


#: service -> its schema sync
SYNCS: dict[str, Sync] = {
    "keystone": _keystone,
    "placement": _one_command("placement-manage", "db", "sync"),
    "glance": _one_command("glance-manage", "db_sync"),
    "nova": _nova,
    "neutron": _one_command("neutron-db-manage", "upgrade", "heads"),
    "cinder": _one_command("cinder-manage", "db", "sync"),
}


def db_sync(service: str) -> None:
    marker = _synced_marker(service)
    if marker.exists() and marker.read_text() == _stamp():
        return
    SYNCS[service](service, str(configs.conf_path(service)))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(_stamp())
