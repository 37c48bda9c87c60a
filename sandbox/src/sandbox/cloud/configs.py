"""Configuration files of every service, written under STATE_DIR/etc on each ``up``.

Service-to-service traffic (token validation, nova -> neutron/placement/glance/cinder, neutron
and cinder -> nova) uses the *internal* endpoints, which point straight at the services; only
the public endpoints (what clients get from the catalog) go through the fault proxy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sandbox.cloud import common as c

Sections = dict[str, dict[str, object]]


def render(sections: Sections) -> str:
    out: list[str] = []
    for name, opts in sections.items():
        out.append(f"[{name}]")
        for key, value in opts.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            out.append(f"{key} = {value}")
        out.append("")
    return "\n".join(out)


def _auth(user: str) -> dict[str, object]:
    return {
        "auth_type": "password",
        "auth_url": c.INTERNAL_AUTH_URL,
        "username": user,
        "password": c.SERVICE_PASSWORD,
        "user_domain_name": "Default",
        "project_name": "service",
        "project_domain_name": "Default",
        "region_name": c.REGION,
    }


def _authtoken(user: str) -> dict[str, object]:
    return {
        "www_authenticate_uri": c.AUTH_URL.removesuffix("/v3"),
        "interface": "internal",
        "service_token_roles_required": True,
        **_auth(user),
    }


def _common(name: str) -> dict[str, object]:
    return {
        "debug": False,
        "use_stderr": True,
        "transport_url": c.TRANSPORT_URL,
        "state_path": str(c.DATA / name),
    }


def _lock(name: str) -> dict[str, object]:
    return {"lock_path": str(c.DATA / name / "locks")}


def keystone() -> Sections:
    d = c.DATA / "keystone"
    return {
        "DEFAULT": {"debug": False, "use_stderr": True},
        "database": {"connection": c.db_url("keystone")},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": str(d / "fernet-keys")},
        "fernet_receipts": {"key_repository": str(d / "fernet-keys")},
        "credential": {"key_repository": str(d / "credential-keys")},
        # As every production Keystone: a cache in front of the database (here in the process's
        # memory: one uwsgi process, so its invalidations on revocations and role changes reach
        # every lookup). Without it each token validation rebuilt the token from the database,
        # over a second each under the suite's load.
        "cache": {"enabled": True, "backend": "dogpile.cache.memory"},
        # bcrypt's cost for the sandbox's throwaway passwords and application credential
        # secrets (Keystone's default, 12, spends a quarter second per login on this machine)
        "identity": {"password_hash_rounds": 4},
    }


def placement() -> Sections:
    return {
        "DEFAULT": {"debug": False, "use_stderr": True},
        "api": {"auth_strategy": "keystone"},
        "placement_database": {"connection": c.db_url("placement")},
        "keystone_authtoken": _authtoken("placement"),
    }


def glance() -> Sections:
    d = c.DATA / "glance"
    return {
        "DEFAULT": {
            "debug": False,
            "use_stderr": True,
            "enabled_backends": "fs:file",
            "workers": 1,
        },
        "glance_store": {"default_backend": "fs"},
        "fs": {"filesystem_store_datadir": str(d / "images")},
        "os_glance_staging_store": {"filesystem_store_datadir": str(d / "staging")},
        "os_glance_tasks_store": {"filesystem_store_datadir": str(d / "tasks")},
        "database": {"connection": c.db_url("glance")},
        "keystone_authtoken": _authtoken("glance"),
        "paste_deploy": {"flavor": "keystone"},
        "oslo_concurrency": _lock("glance"),
    }


def nova() -> Sections:
    internal = {"valid_interfaces": "internal", "region_name": c.REGION}
    return {
        "DEFAULT": {
            **_common("nova"),
            "host": c.COMPUTE_HOST,
            "my_ip": c.HOST,
            "compute_driver": "sailsguest.SandboxGuestDriver",
            "instances_path": str(c.DATA / "nova" / "instances"),
            "reserved_host_memory_mb": 0,
            "reserved_host_disk_mb": 0,
            "heal_instance_info_cache_interval": -1,
            "instance_usage_audit": False,
            "sync_power_state_interval": 5,
        },
        "wsgi": {"api_paste_config": str(c.ETC / "nova" / "api-paste.ini")},
        "api": {"auth_strategy": "keystone"},
        "api_database": {"connection": c.db_url("nova_api")},
        "database": {"connection": c.db_url("nova")},
        "keystone_authtoken": _authtoken("nova"),
        "service_user": {"send_service_user_token": True, **_auth("nova")},
        "placement": {**_auth("placement"), **internal},
        "neutron": {**_auth("neutron"), **internal},
        "glance": internal,
        "cinder": {
            "catalog_info": "volumev3::internalURL",
            "os_region_name": c.REGION,
            **_auth("nova"),
        },
        "conductor": {"workers": 1},
        "scheduler": {"workers": 1, "discover_hosts_in_cells_interval": -1},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_concurrency": _lock("nova"),
        "vnc": {"enabled": False},
        "compute": {
            "cpu_allocation_ratio": 1.0,
            "ram_allocation_ratio": 1.0,
            "disk_allocation_ratio": 1.0,
        },
        "os_vif_ovs": {"ovsdb_connection": "tcp:127.0.0.1:1"},
    }


def neutron() -> Sections:
    return {
        "DEFAULT": {
            **_common("neutron"),
            "core_plugin": "ml2",
            "service_plugins": "router,sails_floatingip,sails_secgroups",
            "auth_strategy": "keystone",
            "api_workers": 1,
            "rpc_workers": 1,
            "rpc_state_report_workers": 0,
            "dhcp_agent_notification": False,
            "notify_nova_on_port_status_changes": True,
            "notify_nova_on_port_data_changes": True,
            "allow_overlapping_ips": True,
            "host": c.COMPUTE_HOST,
        },
        "database": {"connection": c.db_url("neutron")},
        "keystone_authtoken": _authtoken("neutron"),
        "nova": {**_auth("nova"), "endpoint_type": "internal"},
        "ml2": {
            "type_drivers": "flat,vxlan,local",
            "tenant_network_types": "vxlan",
            "mechanism_drivers": "sails_bind",
            "extension_drivers": "port_security",
        },
        "ml2_type_flat": {"flat_networks": "public"},
        "ml2_type_vxlan": {"vni_ranges": "1:1000"},
        "securitygroup": {"firewall_driver": "noop"},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_concurrency": _lock("neutron"),
    }


def cinder() -> Sections:
    return {
        "DEFAULT": {
            **_common("cinder"),
            "host": c.VOLUME_HOST,
            "my_ip": c.HOST,
            "auth_strategy": "keystone",
            "enabled_backends": "sails",
            "osapi_volume_workers": 1,
            # capabilities reach the scheduler within seconds of a (re)start, not a minute
            "periodic_interval": 5,
            "glance_catalog_info": "image:glance:internalURL",
            "api_paste_config": str(c.ETC / "cinder" / "api-paste.ini"),
            "resource_query_filters_file": str(c.ETC / "cinder" / "resource_filters.json"),
        },
        "sails": {
            "volume_driver": "sails_cloud_plugins.cinder_driver.SandboxFileDriver",
            "volume_backend_name": "sails",
        },
        "database": {"connection": c.db_url("cinder")},
        "keystone_authtoken": _authtoken("cinder"),
        "service_user": {"send_service_user_token": True, **_auth("cinder")},
        "nova": {**_auth("nova"), "interface": "internal"},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_concurrency": _lock("cinder"),
    }


FILES = {
    "keystone": ("keystone.conf", keystone),
    "placement": ("placement.conf", placement),
    "glance": ("glance-api.conf", glance),
    "nova": ("nova.conf", nova),
    "neutron": ("neutron.conf", neutron),
    "cinder": ("cinder.conf", cinder),
}

#: Paste files shipped in the services venv's etc/ that the services need beside their config.
PASTE = {
    "nova": ["api-paste.ini"],
    "neutron": ["api-paste.ini"],
    "cinder": ["api-paste.ini", "resource_filters.json"],
    "glance": ["glance-api-paste.ini"],
}


def conf_path(service: str) -> Path:
    return c.ETC / service / FILES[service][0]


def write_all() -> None:
    for service, (fname, build) in FILES.items():
        d = c.ETC / service
        d.mkdir(parents=True, exist_ok=True)
        # Behind the TLS proxy: each API builds its links from X-Forwarded-Proto (https).
        sections = {**build(), "oslo_middleware": {"enable_proxy_headers_parsing": True}}
        (d / fname).write_text(render(sections))
        for paste in PASTE.get(service, []):
            shutil.copyfile(c.VENV / "etc" / service / paste, d / paste)
        (c.DATA / service / "locks").mkdir(parents=True, exist_ok=True)
    for sub in ("images", "staging", "tasks"):
        (c.DATA / "glance" / sub).mkdir(parents=True, exist_ok=True)
    (c.DATA / "nova" / "instances").mkdir(parents=True, exist_ok=True)
