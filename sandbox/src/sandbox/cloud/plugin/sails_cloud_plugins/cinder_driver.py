"""Cinder volume driver: each volume is a sparse file under STATE_DIR/volumes/.

The connection it hands to nova carries the file's path; the sandbox's nova driver makes a loop
device of it and shows it to the guest as a virtio disk.
"""

import contextlib
import os
import shutil
import time

from cinder.volume import driver
from oslo_log import log as logging

from sandbox import layout

LOG = logging.getLogger(__name__)
GiB = 1024**3
#: The connection type nova's sandbox driver understands.
DRIVER_VOLUME_TYPE = "sails_file"
CAPACITY_GB = 1000


def _latency(name: str) -> float:
    """Configured slowness for benchmarks (``sandbox.latency``), 0 when not set."""
    try:
        from sandbox import latency
    except ImportError:
        return 0.0
    return latency.get(name)


def _path(volume) -> str:
    return str(layout.STATE_DIR / "volumes" / f"volume-{volume['id']}")


class SandboxFileDriver(driver.VolumeDriver):
    VERSION = "1.0.0"
    SUPPORTED = True
    CI_WIKI_NAME = "sails_sandbox"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend_name = self.configuration.safe_get("volume_backend_name") or "sails"

    def do_setup(self, context):
        (layout.STATE_DIR / "volumes").mkdir(parents=True, exist_ok=True)

    def check_for_setup_error(self):
        pass

    def _update_volume_stats(self):
        used = 0
        vdir = layout.STATE_DIR / "volumes"
        if vdir.is_dir():
            used = sum(p.stat().st_size for p in vdir.iterdir() if p.is_file()) // GiB
        self._stats = {
            "volume_backend_name": self.backend_name,
            "vendor_name": "ALMA-SAILS sandbox",
            "driver_version": self.VERSION,
            "storage_protocol": DRIVER_VOLUME_TYPE,
            "total_capacity_gb": CAPACITY_GB,
            "free_capacity_gb": CAPACITY_GB - used,
            "reserved_percentage": 0,
            "thin_provisioning_support": True,
            "multiattach": False,
        }

    def create_volume(self, volume):
        delay = _latency("volume_create")
        if delay > 0:
            time.sleep(delay)
        path = _path(volume)
        with open(path, "wb") as fh:
            fh.truncate(int(volume["size"]) * GiB)
        LOG.info("created volume file %s (%s GiB)", path, volume["size"])
        return {}

    def create_cloned_volume(self, volume, src_vref):
        shutil.copyfile(_path(src_vref), _path(volume))
        self.extend_volume(volume, volume["size"])
        return {}

    def delete_volume(self, volume):
        # A real backend wipes or unmaps first: the volume stays "deleting" meanwhile.
        delay = _latency("volume_delete")
        if delay > 0:
            time.sleep(delay)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(volume))

    def extend_volume(self, volume, new_size):
        with open(_path(volume), "r+b") as fh:
            fh.truncate(int(new_size) * GiB)

    def create_snapshot(self, snapshot):
        shutil.copyfile(_path(snapshot.volume), _path(snapshot) + ".snap")

    def delete_snapshot(self, snapshot):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(snapshot) + ".snap")

    def create_volume_from_snapshot(self, volume, snapshot):
        shutil.copyfile(_path(snapshot) + ".snap", _path(volume))
        self.extend_volume(volume, volume["size"])
        return {}

    def ensure_export(self, context, volume):
        pass

    def create_export(self, context, volume, connector):
        pass

    def remove_export(self, context, volume):
        pass

    def initialize_connection(self, volume, connector):
        return {
            "driver_volume_type": DRIVER_VOLUME_TYPE,
            "data": {
                "device_path": _path(volume),
                "volume_id": volume["id"],
                "access_mode": "rw",
            },
        }

    def terminate_connection(self, volume, connector, **kwargs):
        pass
