"""The config drive seed cloud-init reads at a guest's first boot: Nova's tree, or a minimal one
for a guest started directly."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import uuid
from pathlib import Path

from sandbox.guests.state import GuestError, GuestSpec

#: Where cloud-init's ConfigDrive datasource reads a config drive's tree without a device.
SEED_DIR = "var/lib/cloud/seed/config_drive"


def instance_uuid(name: str) -> str:
    """The instance id the minimal seed gives a guest started directly (stable per name)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sails-sandbox-guest:{name}"))


def seed_files(spec: GuestSpec) -> dict[str, bytes]:
    """A minimal config drive tree for a guest started without Nova: what cloud-init's
    ConfigDrive datasource needs (meta_data.json with uuid, hostname and public keys;
    network_data.json with its NIC by MAC; the ephemeral disk's name in the EC2 block device
    mapping; optional user_data)."""
    keys = [line.strip() for line in spec.authorized_keys.splitlines() if line.strip()]
    meta = {
        "uuid": instance_uuid(spec.name),
        "name": spec.hostname,
        "hostname": spec.hostname,
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": {f"key-{i}": key for i, key in enumerate(keys)},
    }
    if keys:
        meta["keys"] = [
            {"name": f"key-{i}", "type": "ssh", "data": key} for i, key in enumerate(keys)
        ]
    mapping = {"ami": "vda", "root": "/dev/vda"}
    if spec.ephemeral_gb > 0:
        mapping["ephemeral0"] = "/dev/vdb"
    network = {
        "links": [{"id": "tap0", "type": "bridge", "mtu": 1500, "ethernet_mac_address": spec.mac}],
        "networks": [
            {
                "id": "network0",
                "type": "ipv4",
                "link": "tap0",
                "ip_address": spec.ip,
                "netmask": str(ipaddress.ip_network(f"0.0.0.0/{spec.prefix}").netmask),
                "routes": [],
            }
        ],
        "services": [],
    }
    files = {
        "openstack/latest/meta_data.json": json.dumps(meta).encode(),
        "openstack/latest/network_data.json": json.dumps(network).encode(),
        "ec2/latest/meta-data.json": json.dumps({"block-device-mapping": mapping}).encode(),
    }
    if spec.user_data:
        files["openstack/latest/user_data"] = spec.user_data.encode()
    return files


def write_seed(upper: Path, files: dict[str, bytes] | Path) -> None:
    """Put a config drive tree (files by relative path, or a directory holding one) where
    cloud-init's ConfigDrive datasource reads it, in the guest's upper layer."""
    seed = upper / SEED_DIR
    shutil.rmtree(seed, ignore_errors=True)
    seed.mkdir(parents=True)
    if isinstance(files, Path):
        shutil.copytree(files, seed, dirs_exist_ok=True)
    else:
        for rel, data in files.items():
            path = seed / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise GuestError(f"bad seed path {rel!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for path in [seed, *seed.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
