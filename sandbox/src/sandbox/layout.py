"""Fixed addresses, ports and directories of the sandbox.

Every part of the sandbox (cloud services, guests, CANFAR stand-ins, package index) takes its
places from here, so that they fit together without knowing each other's code.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Runtime state: databases, volume files, guest overlays, logs, pid files, generated config.
STATE_DIR = Path(os.environ.get("SAILS_SANDBOX_STATE", "/var/lib/sails-sandbox"))
#: Slow-to-build things kept across runs: the services venv, the guest root filesystem, wheels.
CACHE_DIR = Path(os.environ.get("SAILS_SANDBOX_CACHE", "/var/cache/sails-sandbox"))

#: OpenStack APIs (and the fault proxy in front of them) listen on loopback only.
API_HOST = "127.0.0.1"

#: The project's tenant network. Its gateway address sits on a host bridge; every guest reaches
#: it on-link. The CANFAR stand-ins and the package index listen there so that both the host
#: and the guests reach them, exactly as a VM on Arbutus reaches CANFAR.
TENANT_CIDR = "10.211.0.0/24"
TENANT_GATEWAY = "10.211.0.1"
SERVICES_IP = TENANT_GATEWAY

#: The external (floating IP) network; its gateway address sits on another host bridge.
EXTERNAL_CIDR = "172.24.4.0/24"
EXTERNAL_GATEWAY = "172.24.4.1"

#: CANFAR stand-ins and the guests' package index and Debian mirror, all on SERVICES_IP.
ARC_PORT = 64022  # SFTP-only OpenSSH standing in for ws-uv.canfar.net
SKAHA_PORT = 8443  # HTTPS session API (X.509 client certificates or bearer tokens)
CRED_PORT = 8444  # HTTPS: IVOA registry, VOSI capabilities, CDP proxy-certificate service
INDEX_PORT = 8480  # HTTP PEP 503 simple index of wheels for the guests
MIRROR_PORT = 8481  # HTTP signed Debian package mirror for the guests (sandbox.mirror)

#: Name of the clouds.yaml entries the sandbox writes.
CLOUD_NAME = "sandbox"
ADMIN_CLOUD_NAME = "sandbox-admin"


def clouds_yaml() -> Path:
    return STATE_DIR / "clouds.yaml"


#: Host bridges holding the two gateway addresses (no ports needed for the gateway itself; the
#: guests' veth host ends are enslaved to the tenant bridge).
TENANT_BRIDGE = "sails-int"
EXTERNAL_BRIDGE = "sails-ext"
