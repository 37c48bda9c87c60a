"""Places of the sandbox cloud: venv, state directories, ports, database and broker addresses."""

from __future__ import annotations

from pathlib import Path

from sandbox import layout

#: The services' own interpreter and packages, apart from the product's venv.
VENV = layout.CACHE_DIR / "os-venv"
VENV_BIN = VENV / "bin"
SITE = VENV / "lib" / "python3.11" / "site-packages"

#: The checkout that holds ``sandbox`` (made importable inside the services venv).
REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SRC = Path(__file__).resolve().parent / "plugin"

STATE = layout.STATE_DIR
ETC = STATE / "etc"
LOGS = STATE / "logs"
RUN = STATE / "run"
DATA = STATE / "data"
VOLUMES = STATE / "volumes"
MYSQL_DIR = STATE / "mysql"
MYSQL_SOCK = STATE / "run" / "mysql.sock"
RABBIT_DIR = STATE / "rabbitmq"

HOST = layout.API_HOST
#: Where clients reach the public endpoints (the fault proxy, over TLS): the tenant gateway, so
#: that the guests reach the cloud's API as a VM on Arbutus does; the proxy also answers on
#: loopback.
PUBLIC_HOST = layout.SERVICES_IP
MYSQL_PORT = 13306
RABBIT_PORT = 5672
RABBIT_NODE = "sails@localhost"
TRANSPORT_URL = f"rabbit://guest:guest@{HOST}:{RABBIT_PORT}/"
REGION = "RegionOne"

#: Host name nova-compute and cinder-volume register under.
COMPUTE_HOST = "sails-compute"
VOLUME_HOST = "sails-volume"

#: service type -> (name, public port on the fault proxy, path of the endpoint).
#: Each service itself listens on the public port + BACKEND_OFFSET.
ENDPOINTS: dict[str, tuple[str, int, str]] = {
    "identity": ("keystone", 5000, "/v3"),
    "placement": ("placement", 8778, ""),
    "image": ("glance", 9292, ""),
    "compute": ("nova", 8774, "/v2.1"),
    "network": ("neutron", 9696, ""),
    "block-storage": ("cinderv3", 8776, "/v3/%(project_id)s"),
    "volumev3": ("cinderv3", 8776, "/v3/%(project_id)s"),
}
BACKEND_OFFSET = 10000
#: The fault proxy's control API.
FAULTS_CTL_PORT = 8799

#: Credentials of the sandbox's own accounts (loopback only, throwaway).
ADMIN_PASSWORD = "sails-admin-secret"
SERVICE_PASSWORD = "sails-service-secret"
USER_PASSWORD = "sails-user-secret"
PROJECT = "alma-sails"
USER = "sails"
ADMIN_USER = "admin"


def db_url(name: str) -> str:
    return f"mysql+pymysql://root@{HOST}:{MYSQL_PORT}/{name}?charset=utf8"


def public_url(service_type: str) -> str:
    """HTTPS, as every public endpoint of a real cloud: the fault proxy terminates TLS with a
    certificate of the sandbox CA (clouds.yaml names it as ``cacert``)."""
    _, port, path = ENDPOINTS[service_type]
    return f"https://{PUBLIC_HOST}:{port}{path}"


def internal_url(service_type: str) -> str:
    _, port, path = ENDPOINTS[service_type]
    return f"http://{HOST}:{port + BACKEND_OFFSET}{path}"


def backend_port(service_type: str) -> int:
    return ENDPOINTS[service_type][1] + BACKEND_OFFSET


AUTH_URL = public_url("identity")
INTERNAL_AUTH_URL = internal_url("identity")
