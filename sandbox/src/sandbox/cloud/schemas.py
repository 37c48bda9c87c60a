"""The services' database schemas: each service's sync (keystone's also sets up its keys and
bootstraps the admin account and the identity endpoint; nova's also maps cell0 and creates
cell1), run once per set of pinned packages (a marker under STATE_DIR/db-synced).
"""

from __future__ import annotations

import subprocess

from sandbox.cloud import common as c
from sandbox.cloud import configs, packages
from sandbox.cloud.commands import run_setup, venv_bin


def _synced_marker(service: str):
    return c.STATE / "db-synced" / service


def _stamp() -> str:
    return "\n".join(packages.PINNED)


def db_sync(service: str) -> None:
    marker = _synced_marker(service)
    if marker.exists() and marker.read_text() == _stamp():
        return
    conf = str(configs.conf_path(service))
    if service == "keystone":
        km = [venv_bin("keystone-manage"), "--config-file", conf]
        run_setup([*km, "db_sync"], service)
        run_setup(
            [*km, "fernet_setup", "--keystone-user", "root", "--keystone-group", "root"], service
        )
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
    elif service == "placement":
        run_setup([venv_bin("placement-manage"), "--config-file", conf, "db", "sync"], service)
    elif service == "glance":
        run_setup([venv_bin("glance-manage"), "--config-file", conf, "db_sync"], service)
    elif service == "nova":
        nm = [venv_bin("nova-manage"), "--config-file", conf]
        run_setup([*nm, "api_db", "sync"], service)
        run_setup(
            [*nm, "cell_v2", "map_cell0", "--database_connection", c.db_url("nova_cell0")], service
        )
        cells = subprocess.run([*nm, "cell_v2", "list_cells"], capture_output=True, text=True)
        if " cell1 " not in cells.stdout:
            run_setup([*nm, "cell_v2", "create_cell", "--name", "cell1"], service)
        run_setup([*nm, "db", "sync"], service)
    elif service == "neutron":
        run_setup(
            [venv_bin("neutron-db-manage"), "--config-file", conf, "upgrade", "heads"], service
        )
    elif service == "cinder":
        run_setup([venv_bin("cinder-manage"), "--config-file", conf, "db", "sync"], service)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(_stamp())
