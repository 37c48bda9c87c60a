"""nova-compute and cinder-volume in the databases: whether they registered and report (a
heartbeat recent enough for the schedulers), and mapping the compute host into cell1.
"""

from __future__ import annotations

from sandbox.cloud import common as c
from sandbox.cloud import configs
from sandbox.cloud.commands import run_setup, venv_bin
from sandbox.cloud.infra import sql
from sandbox.cloud.probes import wait_for


def _counted(statement: str, database: str) -> bool:
    """A ``SELECT COUNT(*)`` that counts more than nothing."""
    return sql(statement, database).strip() not in ("", "0")


def compute_mapped() -> bool:
    return _counted(f"SELECT COUNT(*) FROM host_mappings WHERE host='{c.COMPUTE_HOST}'", "nova_api")


def compute_node_present() -> bool:
    return _counted(
        f"SELECT COUNT(*) FROM compute_nodes WHERE host='{c.COMPUTE_HOST}' AND deleted=0", "nova"
    )


def compute_service_up() -> bool:
    """What the scheduler's ComputeFilter asks: a heartbeat within ``service_down_time`` (60 s;
    50 here for margin). After a restart the compute node's row is there at once, but until
    the new nova-compute reports, its last heartbeat is the one before the stop: a server
    booted then gets "No valid host was found"."""
    return _counted(
        "SELECT COUNT(*) FROM services WHERE `binary`='nova-compute' AND deleted=0 "
        "AND disabled=0 AND updated_at > UTC_TIMESTAMP() - INTERVAL 50 SECOND",
        "nova",
    )


def volume_service_up() -> bool:
    return _counted(
        "SELECT COUNT(*) FROM services WHERE `binary`='cinder-volume' AND deleted=0 "
        "AND updated_at > NOW() - INTERVAL 60 SECOND",
        "cinder",
    )


def discover_hosts() -> None:
    wait_for("nova-compute registered", compute_node_present, 120, 0.5)
    if not compute_mapped():
        run_setup(
            [
                venv_bin("nova-manage"),
                "--config-file",
                str(configs.conf_path("nova")),
                "cell_v2",
                "discover_hosts",
            ],
            "nova",
        )
    wait_for("nova-compute mapped", compute_mapped, 30, 0.5)
