"""Nova compute driver whose servers are systemd-nspawn guests (``sandbox.guests``).

Nova's own fake driver keeps the bookkeeping (resources, the instance list); this driver adds
the machine behind each server: spawn writes the instance's config drive with nova's own code
(``InstanceMetadata`` + ``ConfigDriveBuilder``: meta_data.json with the key, hostname and uuid,
user_data, network_data.json, injected files) into the guest's cloud-init seed and boots a guest
with the server's MAC and fixed IP. As with libvirt, spawn returns once the guest runs (the
server goes ACTIVE), not when its OS is up: cloud-init creates the user and the host keys and
sshd answers later. Power and reboot act on the guest the same way; volumes (cinder's
``sails_file`` connections) become virtio-like disks inside it; the console output is the
guest's real console, its last 100 KiB. get_info asks the guest, so a guest that powered itself
off is seen as SHUTOFF by nova's power-state sync.

When the guests library cannot be imported the driver keeps the fake driver's behaviour (an
API-level cloud with nothing behind the servers).
"""

import shutil
import tempfile
from pathlib import Path

from nova import exception
from nova.api.metadata import base as instance_metadata
from nova.compute import power_state
from nova.virt import configdrive, fake, hardware
from nova.virt import driver as virt_driver
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

try:
    from sandbox import guests as _guests
except Exception:  # the library is optional: without it, fake-driver behaviour
    LOG.warning("sandbox.guests not importable: servers are API-only", exc_info=True)
    _guests = None

_STATES = {
    "running": power_state.RUNNING,
    "shutdown": power_state.SHUTDOWN,
    "absent": power_state.NOSTATE,
}


def guest_name(instance) -> str:
    return "os-" + instance.uuid.replace("-", "")[:12]


def guest_spec(instance, network_info):
    """The guest's description from nova's instance and its first IPv4 VIF."""
    for vif in network_info or []:
        for subnet in vif["network"]["subnets"]:
            if subnet["version"] != 4:
                continue
            ips = [ip["address"] for ip in subnet["ips"]]
            if not ips:
                continue
            gateway = subnet.get("gateway") or {}
            return _guests.GuestSpec(
                name=guest_name(instance),
                hostname=instance.hostname or guest_name(instance),
                mac=vif["address"],
                ip=ips[0],
                prefix=int(subnet["cidr"].split("/")[1]),
                gateway=gateway.get("address") or "",
                authorized_keys=instance.key_data or "",
                ephemeral_gb=int(instance.flavor.ephemeral_gb or 0),
            )
    raise exception.InstanceDeployFailure(
        reason="the sandbox needs an IPv4 network on the server", instance_id=instance.uuid
    )


def config_drive_tree(instance, injected_files, admin_password, network_info, target):
    """The instance's config drive files, as nova's libvirt driver puts them on the drive."""
    extra_md = {}
    if admin_password:
        extra_md["admin_pass"] = admin_password
    inst_md = instance_metadata.InstanceMetadata(
        instance, content=injected_files, extra_md=extra_md, network_info=network_info
    )
    with configdrive.ConfigDriveBuilder(instance_md=inst_md) as cdb:
        cdb._write_md_files(str(target))


def _volume(connection_info):
    data = connection_info.get("data") or {}
    serial = connection_info.get("serial") or data.get("volume_id")
    return data.get("device_path"), serial


class SandboxGuestDriver(fake.FakeDriverWithoutFakeNodes):
    # Room for at least four of the seed flavor (1 vCPU, 7.5 GiB, 20 + 36 GB).
    vcpus = 16
    memory_mb = 65536
    local_gb = 600

    capabilities = {
        **fake.FakeDriverWithoutFakeNodes.capabilities,
        "supports_multiattach": False,
        "supports_device_tagging": False,
    }

    # life cycle -------------------------------------------------------------------------------
    def spawn(
        self,
        context,
        instance,
        image_meta,
        injected_files,
        admin_password,
        allocations,
        network_info=None,
        block_device_info=None,
        power_on=True,
        accel_info=None,
    ):
        super().spawn(
            context,
            instance,
            image_meta,
            injected_files,
            admin_password,
            allocations,
            network_info,
            block_device_info,
            power_on,
            accel_info,
        )
        if _guests is None or not power_on:
            return
        seed = Path(tempfile.mkdtemp(prefix="config-drive-"))
        try:
            config_drive_tree(instance, injected_files, admin_password, network_info, seed)
            # ACTIVE once the guest's systemd runs; its own boot reaches sshd later
            _guests.start_guest(
                guest_spec(instance, network_info), timeout=90, wait=False, seed=seed
            )
        except Exception as exc:
            LOG.exception("guest for %s did not start", instance.uuid)
            try:
                _guests.destroy_guest(guest_name(instance))
            finally:
                super().destroy(context, instance, network_info, block_device_info)
            raise exception.InstanceDeployFailure(
                reason=str(exc), instance_id=instance.uuid
            ) from exc
        finally:
            shutil.rmtree(seed, ignore_errors=True)

    def destroy(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_disks=True,
        destroy_secrets=True,
    ):
        if _guests is not None:
            _guests.destroy_guest(guest_name(instance))
        super().destroy(
            context, instance, network_info, block_device_info, destroy_disks, destroy_secrets
        )

    def power_off(self, instance, timeout=0, retry_interval=0):
        if _guests is not None:
            _guests.stop_guest(guest_name(instance))
        self._remember(instance, power_state.SHUTDOWN)

    def power_on(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        accel_info=None,
        share_info=None,
    ):
        if _guests is not None:
            name = guest_name(instance)
            if _guests.power_state(name) != "running":
                _guests.start_guest(guest_spec(instance, network_info), timeout=90, wait=False)
                self._replug_volumes(instance, block_device_info)
        self._remember(instance, power_state.RUNNING)

    def reboot(
        self,
        context,
        instance,
        network_info,
        reboot_type,
        block_device_info=None,
        bad_volumes_callback=None,
        accel_info=None,
        share_info=None,
    ):
        if _guests is None:
            return super().reboot(
                context,
                instance,
                network_info,
                reboot_type,
                block_device_info,
                bad_volumes_callback,
                accel_info,
                share_info,
            )
        name = guest_name(instance)
        if _guests.power_state(name) == "running":
            _guests.reboot_guest(name, hard=reboot_type.upper() == "HARD", wait=False)
        else:
            _guests.start_guest(guest_spec(instance, network_info), timeout=90, wait=False)
        self._replug_volumes(instance, block_device_info)
        self._remember(instance, power_state.RUNNING)

    def _remember(self, instance, state):
        fake_instance = self.instances.get(instance.uuid)
        if fake_instance is None:
            self.instances[instance.uuid] = fake.FakeInstance(instance.name, state, instance.uuid)
        else:
            fake_instance.state = state

    def _replug_volumes(self, instance, block_device_info):
        """Show the attached volumes again after a fresh boot of the guest."""
        for bdm in virt_driver.block_device_info_get_mapping(block_device_info):
            path, serial = _volume(bdm["connection_info"])
            if not path:
                continue
            try:
                _guests.attach_volume(guest_name(instance), path, serial)
            except Exception:
                LOG.warning("re-attaching %s to %s", serial, instance.uuid, exc_info=True)

    def get_info(self, instance, use_cache=True):
        if _guests is None:
            return super().get_info(instance, use_cache)
        state = _STATES.get(_guests.power_state(guest_name(instance)), power_state.NOSTATE)
        if state == power_state.NOSTATE:
            if instance.uuid not in self.instances:
                raise exception.InstanceNotFound(instance_id=instance.uuid)
            state = power_state.SHUTDOWN
        return hardware.InstanceInfo(state=state)

    def instance_exists(self, instance):
        if _guests is None:
            return super().instance_exists(instance)
        return _guests.power_state(guest_name(instance)) != "absent"

    # volumes ----------------------------------------------------------------------------------
    def attach_volume(
        self,
        context,
        connection_info,
        instance,
        mountpoint,
        disk_bus=None,
        device_type=None,
        encryption=None,
    ):
        if _guests is not None:
            path, serial = _volume(connection_info)
            if not path:
                raise exception.VolumeDriverNotFound(
                    driver_type=connection_info.get("driver_volume_type")
                )
            device = _guests.attach_volume(guest_name(instance), path, serial)
            connection_info.setdefault("data", {})["guest_device"] = device
        super().attach_volume(
            context, connection_info, instance, mountpoint, disk_bus, device_type, encryption
        )

    def detach_volume(self, context, connection_info, instance, mountpoint, encryption=None):
        if _guests is not None:
            _, serial = _volume(connection_info)
            _guests.detach_volume(guest_name(instance), serial)
        super().detach_volume(context, connection_info, instance, mountpoint, encryption)

    def default_root_device_name(self, instance, image_meta, root_bdm):
        return "/dev/vda"

    # console ----------------------------------------------------------------------------------
    def get_console_output(self, context, instance):
        if _guests is None:
            return b"FAKE CONSOLE OUTPUT\n"
        out = _guests.console_output(guest_name(instance))
        return out if isinstance(out, bytes) else str(out).encode("utf-8", "replace")
