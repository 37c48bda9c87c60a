"""MariaDB and RabbitMQ, the sandbox cloud's database and message broker: starting them,
waiting until they answer (creating the services' databases), SQL from the shell, and the
Erlang port mapper left behind.
"""

from __future__ import annotations

import subprocess

from sandbox.cloud import common as c
from sandbox.cloud import procs
from sandbox.cloud.commands import run_setup
from sandbox.cloud.probes import port_open, wait_for

DATABASES = [
    "keystone",
    "placement",
    "glance",
    "nova_api",
    "nova_cell0",
    "nova",
    "neutron",
    "cinder",
]

INFRA = ["mariadb", "rabbitmq"]


def sql(statement: str, database: str | None = None) -> str:
    argv = [
        "mariadb",
        "--no-defaults",
        f"--socket={c.MYSQL_SOCK}",
        "-u",
        "root",
        "-N",
        "-B",
        "-e",
        statement,
    ]
    if database:
        argv.append(database)
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def start_mariadb() -> None:
    if procs.running("mariadb"):
        return
    if not (c.MYSQL_DIR / "mysql").is_dir():
        c.MYSQL_DIR.mkdir(parents=True, exist_ok=True)
        run_setup(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={c.MYSQL_DIR}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            "mariadb",
        )
    c.RUN.mkdir(parents=True, exist_ok=True)
    procs.start(
        "mariadb",
        [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={c.MYSQL_DIR}",
            "--user=root",
            f"--bind-address={c.HOST}",
            f"--port={c.MYSQL_PORT}",
            f"--socket={c.MYSQL_SOCK}",
            f"--pid-file={c.RUN / 'mariadbd.pid'}",
            "--skip-grant-tables",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=256M",
            "--innodb-flush-log-at-trx-commit=0",
            "--max-connections=1000",
            "--character-set-server=utf8mb3",
            "--collation-server=utf8mb3_general_ci",
        ],
    )


def wait_mariadb() -> None:
    wait_for("mariadb", lambda: sql("SELECT 1").strip() == "1", 60, 0.2)
    sql("; ".join(f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8" for db in DATABASES))


def _rabbit_env() -> dict[str, str]:
    return {
        "HOME": str(c.RABBIT_DIR),
        "RABBITMQ_NODENAME": c.RABBIT_NODE,
        "RABBITMQ_NODE_IP_ADDRESS": c.HOST,
        "RABBITMQ_NODE_PORT": str(c.RABBIT_PORT),
        "RABBITMQ_MNESIA_BASE": str(c.RABBIT_DIR / "mnesia"),
        "RABBITMQ_LOG_BASE": str(c.LOGS),
        "RABBITMQ_LOGS": str(c.LOGS / "rabbitmq-node.log"),
        "RABBITMQ_PID_FILE": str(c.RUN / "rabbitmq-node.pid"),
        "RABBITMQ_CONFIG_FILE": str(c.RABBIT_DIR / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(c.RABBIT_DIR / "enabled_plugins"),
        "RABBITMQ_SERVER_START_ARGS": "-kernel inet_dist_listen_min 25672 "
        "-kernel inet_dist_listen_max 25672",
    }


def start_rabbitmq() -> None:
    if procs.running("rabbitmq"):
        return
    c.RABBIT_DIR.mkdir(parents=True, exist_ok=True)
    (c.RABBIT_DIR / "enabled_plugins").write_text("[].\n")
    procs.start(
        "rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=_rabbit_env(), cwd=c.RABBIT_DIR
    )


def wait_rabbitmq() -> None:
    wait_for("rabbitmq", lambda: port_open(c.RABBIT_PORT), 90, 0.3)


def stop_epmd() -> None:
    """The Erlang port mapper that RabbitMQ started, unless another node still uses it."""
    names = subprocess.run(["epmd", "-names"], capture_output=True, text=True, check=False)
    registered = [ln for ln in names.stdout.splitlines() if ln.startswith("name ")]
    if names.returncode == 0 and not registered:
        subprocess.run(["epmd", "-kill"], capture_output=True, check=False)
