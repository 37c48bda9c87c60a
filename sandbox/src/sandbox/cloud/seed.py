"""Keystone catalog, service accounts and the project's starting point, all idempotent.

Seeding talks to the services' internal endpoints (straight, not through the fault proxy), so
its requests never show in the proxy's counts.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import secrets
from typing import Any

import openstack
import yaml
from openstack.connection import Connection

from sandbox import layout
from sandbox.cloud import common as c

SERVICE_USERS = ["placement", "glance", "nova", "neutron", "cinder"]
IMAGE_NAME = "Ubuntu-24.04-Noble-x64-2024-06"
FLAVORS = {
    # name: (vcpus, ram MB, root GB, ephemeral GB)
    "c1-7.5gb-36": (1, 7680, 20, 36),
    "p1-1.5gb": (1, 1536, 10, 0),
}
TENANT_NET = "alma-sails-network"
TENANT_SUBNET = "alma-sails-subnet"
ROUTER = "alma-sails-router"
EXTERNAL_NET = "public"
EXTERNAL_SUBNET = "public-subnet"
APP_CRED_NAME = "sails-sandbox"
SECRETS_FILE = c.STATE / "seed-secrets.json"


def admin_connection(interface: str = "internal") -> Connection:
    from sandbox import ca

    return openstack.connect(
        auth_url=c.INTERNAL_AUTH_URL if interface == "internal" else c.AUTH_URL,
        cacert=str(ca.ca_cert_path()),
        username=c.ADMIN_USER,
        password=c.ADMIN_PASSWORD,
        project_name="admin",
        user_domain_name="Default",
        project_domain_name="Default",
        region_name=c.REGION,
        interface=interface,
        identity_interface=interface,
        load_yaml_config=False,
        load_envvars=False,
    )


def register_services() -> None:
    """Service project, role, one user per service, and the catalog (public via the proxy)."""
    conn = admin_connection()
    ident = conn.identity
    service_project = ident.find_project("service", domain_id="default") or ident.create_project(
        name="service", domain_id="default"
    )
    roles = {}
    for role_name in ("admin", "service", "member", "reader"):
        roles[role_name] = ident.find_role(role_name) or ident.create_role(name=role_name)
    for name in SERVICE_USERS:
        user = ident.find_user(name, domain_id="default")
        if user is None:
            user = ident.create_user(
                name=name, password=c.SERVICE_PASSWORD, domain_id="default", enabled=True
            )
        for role_name in ("admin", "service"):
            ident.assign_project_role_to_user(service_project, user, roles[role_name])
    existing = {(s.type): s for s in ident.services()}
    endpoints = list(ident.endpoints())
    for stype, (name, _port, _path) in c.ENDPOINTS.items():
        # identity's own service and endpoints come from keystone-manage bootstrap; they are
        # reconciled here too, so a sandbox made before the endpoints spoke TLS follows.
        service = existing.get(stype) or ident.create_service(name=name, type=stype)
        for interface, url in (
            ("public", c.public_url(stype)),
            ("internal", c.internal_url(stype)),
            ("admin", c.internal_url(stype)),
        ):
            have = [e for e in endpoints if e.service_id == service.id and e.interface == interface]
            if any(e.url == url for e in have):
                continue
            for e in have:
                ident.delete_endpoint(e)
            ident.create_endpoint(
                service_id=service.id, interface=interface, url=url, region_id=c.REGION
            )


def volume_backend_known() -> bool:
    """cinder-scheduler has heard of the volume backend (else creations fail NoValidBackend)."""
    conn = admin_connection()
    try:
        return bool(list(conn.block_storage.backend_pools()))
    finally:
        conn.close()


def _secrets() -> dict[str, Any]:
    try:
        return json.loads(SECRETS_FILE.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _tiny_image() -> bytes:
    # 1 MiB raw disk: the guests boot from the sandbox's own root file system, not from it.
    return b"\0" * (1 << 20)


def seed() -> dict[str, Any]:
    """Create the project's world if missing; write clouds.yaml. Returns ids of what exists."""
    conn = admin_connection()
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        # image and flavors do not depend on the project: seed them alongside
        image_f = pool.submit(_seed_image, conn)
        flavors_f = pool.submit(_seed_flavors, conn)
        project, user = _seed_identity(conn)
        app_f = pool.submit(_seed_app_credential)
        nets = _seed_network(conn, project)
        _seed_quotas(conn, project)
        image = image_f.result()
        flavors_f.result()
        app_f.result()
    return {
        "project_id": project.id,
        "user_id": user.id,
        "image_id": image.id,
        **nets,
    }


def _seed_identity(conn: Connection) -> tuple[Any, Any]:
    ident = conn.identity
    project = ident.find_project(c.PROJECT, domain_id="default") or ident.create_project(
        name=c.PROJECT, domain_id="default", description="ALMA-SAILS sandbox project"
    )
    user = ident.find_user(c.USER, domain_id="default") or ident.create_user(
        name=c.USER,
        password=c.USER_PASSWORD,
        domain_id="default",
        default_project_id=project.id,
        enabled=True,
    )
    ident.assign_project_role_to_user(project, user, ident.find_role("member"))
    admin_user = ident.find_user(c.ADMIN_USER, domain_id="default")
    ident.assign_project_role_to_user(project, admin_user, ident.find_role("admin"))
    return project, user


def _seed_image(conn: Connection) -> Any:
    image = conn.image.find_image(IMAGE_NAME)
    if image is None or image.status != "active":
        if image is not None:
            conn.image.delete_image(image)
        image = conn.image.create_image(
            name=IMAGE_NAME,
            data=_tiny_image(),
            disk_format="raw",
            container_format="bare",
            visibility="public",
            properties={"os_distro": "ubuntu", "os_version": "24.04"},
        )
    return image


def _seed_flavors(conn: Connection) -> None:
    existing = {f.name for f in conn.compute.flavors(is_public=None)}
    for name, (vcpus, ram, disk, eph) in FLAVORS.items():
        if name not in existing:
            conn.compute.create_flavor(
                name=name, vcpus=vcpus, ram=ram, disk=disk, ephemeral=eph, is_public=True
            )


def _seed_network(conn: Connection, project: Any) -> dict[str, str]:
    net = conn.network
    ext = net.find_network(EXTERNAL_NET)
    if ext is None:
        ext = net.create_network(
            name=EXTERNAL_NET,
            is_router_external=True,
            provider_network_type="flat",
            provider_physical_network="public",
            is_shared=False,
        )
    if net.find_subnet(EXTERNAL_SUBNET) is None:
        net.create_subnet(
            name=EXTERNAL_SUBNET,
            network_id=ext.id,
            ip_version=4,
            cidr=layout.EXTERNAL_CIDR,
            gateway_ip=layout.EXTERNAL_GATEWAY,
            enable_dhcp=False,
            allocation_pools=[
                {"start": _host(layout.EXTERNAL_CIDR, 10), "end": _host(layout.EXTERNAL_CIDR, 250)}
            ],
        )
    tenant = net.find_network(TENANT_NET, project_id=project.id)
    if tenant is None:
        tenant = net.create_network(name=TENANT_NET, project_id=project.id)
    subnet = net.find_subnet(TENANT_SUBNET, project_id=project.id)
    if subnet is None:
        subnet = net.create_subnet(
            name=TENANT_SUBNET,
            network_id=tenant.id,
            project_id=project.id,
            ip_version=4,
            cidr=layout.TENANT_CIDR,
            gateway_ip=layout.TENANT_GATEWAY,
            enable_dhcp=True,
            allocation_pools=[
                {"start": _host(layout.TENANT_CIDR, 10), "end": _host(layout.TENANT_CIDR, 250)}
            ],
        )
    router = net.find_router(ROUTER, project_id=project.id)
    if router is None:
        router = net.create_router(
            name=ROUTER,
            project_id=project.id,
            external_gateway_info={"network_id": ext.id},
        )
    if not list(net.ports(device_id=router.id, network_id=tenant.id)):
        net.add_interface_to_router(router, subnet_id=subnet.id)
    return {
        "tenant_network_id": tenant.id,
        "external_network_id": ext.id,
        "router_id": router.id,
    }


def _seed_quotas(conn: Connection, project: Any) -> None:
    """Through the services' own quota APIs, as an operator would."""
    conn.set_compute_quotas(project.id, instances=4, cores=4, ram=16384)
    conn.set_volume_quotas(project.id, gigabytes=100, volumes=10, snapshots=10)
    conn.set_network_quotas(
        project.id, floatingip=10, security_group=20, security_group_rule=200, port=50
    )


def _seed_app_credential() -> None:
    """The project user's application credential (kept across runs) and clouds.yaml."""
    stored = _secrets()
    user_conn = openstack.connect(
        auth_url=c.INTERNAL_AUTH_URL,
        username=c.USER,
        password=c.USER_PASSWORD,
        project_name=c.PROJECT,
        user_domain_name="Default",
        project_domain_name="Default",
        region_name=c.REGION,
        interface="internal",
        load_yaml_config=False,
        load_envvars=False,
    )
    uid = user_conn.current_user_id
    creds = list(user_conn.identity.application_credentials(uid, name=APP_CRED_NAME))
    if creds and stored.get("app_cred_id") == creds[0].id and stored.get("app_cred_secret"):
        app_id, app_secret = stored["app_cred_id"], stored["app_cred_secret"]
    else:
        for cred in creds:
            user_conn.identity.delete_application_credential(uid, cred)
        app_secret = secrets.token_urlsafe(24)
        cred = user_conn.identity.create_application_credential(
            uid,
            name=APP_CRED_NAME,
            secret=app_secret,
            description="sandbox: the provisioning tool's credential",
        )
        app_id = cred.id
        SECRETS_FILE.write_text(json.dumps({"app_cred_id": app_id, "app_cred_secret": app_secret}))
        os.chmod(SECRETS_FILE, 0o600)
    write_clouds_yaml(app_id, app_secret)


def _host(cidr: str, n: int) -> str:
    import ipaddress

    return str(ipaddress.ip_network(cidr)[n])


def write_clouds_yaml(app_id: str, app_secret: str) -> None:
    from sandbox import ca

    common = {
        "region_name": c.REGION,
        "interface": "public",
        "identity_api_version": 3,
        "cacert": str(ca.ca_cert_path()),
    }
    clouds = {
        layout.CLOUD_NAME: {
            "auth_type": "v3applicationcredential",
            "auth": {
                "auth_url": c.AUTH_URL,
                "application_credential_id": app_id,
                "application_credential_secret": app_secret,
            },
            **common,
        },
        f"{layout.CLOUD_NAME}-password": {
            "auth_type": "password",
            "auth": {
                "auth_url": c.AUTH_URL,
                "username": c.USER,
                "password": c.USER_PASSWORD,
                "project_name": c.PROJECT,
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            **common,
        },
        layout.ADMIN_CLOUD_NAME: {
            "auth_type": "password",
            "auth": {
                "auth_url": c.AUTH_URL,
                "username": c.ADMIN_USER,
                "password": c.ADMIN_PASSWORD,
                "project_name": "admin",
                "user_domain_name": "Default",
                "project_domain_name": "Default",
            },
            **common,
        },
    }
    path = layout.clouds_yaml()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"clouds": clouds}, sort_keys=False))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
