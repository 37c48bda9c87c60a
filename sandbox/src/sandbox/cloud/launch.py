"""The sandbox cloud's OpenStack processes and how each starts: the APIs served by uWSGI and
the plain daemons (tables of name -> how to run it), which belong to which service, and the
fault proxy in front of the public endpoints; ``api_ready`` asks an API's backend port.
"""

from __future__ import annotations

from sandbox.cloud import common as c
from sandbox.cloud import configs, procs
from sandbox.cloud.commands import venv_bin
from sandbox.cloud.probes import http_answers

#: uwsgi-served APIs: name -> (service type, wsgi file relative to site-packages, env, extra args)
APIS: dict[str, tuple[str, str, dict[str, str], list[str]]] = {
    "keystone": (
        "identity",
        "keystone/wsgi/api.py",
        {"OS_KEYSTONE_CONFIG_DIR": str(c.ETC / "keystone")},
        [],
    ),
    "placement-api": (
        "placement",
        "placement/wsgi/api.py",
        {"OS_PLACEMENT_CONFIG_DIR": str(c.ETC / "placement")},
        [],
    ),
    "glance-api": (
        "image",
        "glance/wsgi/api.py",
        {"OS_GLANCE_CONFIG_DIR": str(c.ETC / "glance")},
        [],
    ),
    "nova-api": (
        "compute",
        "nova/wsgi/osapi_compute.py",
        {"OS_NOVA_CONFIG_DIR": str(c.ETC / "nova")},
        [],
    ),
    "neutron-api": (
        "network",
        "neutron/wsgi/api.py",
        {
            "OS_NEUTRON_CONFIG_DIR": str(c.ETC / "neutron"),
            "OS_NEUTRON_CONFIG_FILES": "neutron.conf",
        },
        [],
    ),
    "cinder-api": (
        "block-storage",
        "cinder/wsgi/api.py",
        {},
        ["--pyargv", f"--config-file {c.ETC / 'cinder' / 'cinder.conf'}"],
    ),
}

#: Plain daemons: name -> (console script, service whose config file it reads)
DAEMONS: dict[str, tuple[str, str]] = {
    "nova-conductor": ("nova-conductor", "nova"),
    "nova-scheduler": ("nova-scheduler", "nova"),
    "nova-compute": ("nova-compute", "nova"),
    "neutron-rpc-server": ("neutron-rpc-server", "neutron"),
    "cinder-scheduler": ("cinder-scheduler", "cinder"),
    "cinder-volume": ("cinder-volume", "cinder"),
}

#: Which processes belong to which service (started once its schema is in place).
SERVICE_PROCS = {
    "placement": ["placement-api"],
    "glance": ["glance-api"],
    "nova": ["nova-api", "nova-conductor", "nova-scheduler", "nova-compute"],
    "neutron": ["neutron-api", "neutron-rpc-server"],
    "cinder": ["cinder-api", "cinder-scheduler", "cinder-volume"],
}

FAULTS = "fault-proxy"


def start_api(name: str) -> None:
    service_type, wsgi, env, extra = APIS[name]
    argv = [
        venv_bin("uwsgi"),
        "--http",
        f"{c.HOST}:{c.backend_port(service_type)}",
        "--wsgi-file",
        str(c.SITE / wsgi),
        "--master",
        "--processes",
        "1",
        "--threads",
        "4",
        "--die-on-term",
        "--lazy-apps",
        "--need-app",
        "--add-header",
        "Connection: close",
        "--buffer-size",
        "65535",
        "--http-timeout",
        "600",
        "--socket-timeout",
        "600",
        "--procname-prefix-spaced",
        f"sails-{name}",
        *extra,
    ]
    procs.start(name, argv, env=env)


def start_daemon(name: str) -> None:
    script, service = DAEMONS[name]
    procs.start(name, [venv_bin(script), "--config-file", str(configs.conf_path(service))])


def start_process(name: str) -> None:
    if name in APIS:
        start_api(name)
    else:
        start_daemon(name)


def start_faults() -> None:
    from sandbox import ca, faults

    cert, key = ca.server_certificate(c.PUBLIC_HOST, c.HOST)
    upstreams = {
        stype: (port, c.backend_port(stype))
        for stype, (_, port, _) in c.ENDPOINTS.items()
        if stype != "volumev3"
    }
    procs.start(
        FAULTS,
        faults.server_argv(
            str(c.VENV_BIN / "python"),
            upstreams,
            c.FAULTS_CTL_PORT,
            (c.HOST, c.PUBLIC_HOST),
            tls=(str(cert), str(key)),
        ),
    )


def api_ready(name: str) -> bool:
    service_type = APIS[name][0]
    return http_answers(c.backend_port(service_type))
