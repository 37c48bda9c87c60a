"""Guests that boot as Ubuntu cloud VMs do: systemd-nspawn containers with systemd as PID 1.

Each guest has its own network namespace (a veth on the tenant bridge with the guest's MAC and
fixed IP, no default route), an overlay on the golden root filesystem (a stock cloud image: no
user, no host keys, cloud-init), and block devices plugged as /dev/vdX with
/dev/disk/by-id/virtio-<serial> links as a KVM guest shows them. Before the first boot the
guest's upper layer gets a config drive seed (/var/lib/cloud/seed/config_drive: Nova's own tree
from the sandbox's Nova driver, or a minimal one from ``write_seed`` for guests started
directly), so cloud-init creates ``ubuntu`` with the instance's key, generates the host keys,
prints their fingerprints on the console, mounts the ephemeral disk at /mnt and runs the
user-data, once per instance. A small supervisor process per guest
(``sandbox.guests.supervisor``, in its own session) runs systemd-nspawn, starts it again after
``sudo reboot`` (nspawn exits 133) and records a power-off, so the guest behaves as a VM.

State lives under ``$STATE_DIR/guests/<name>/``: ``guest.json`` (spec, namespace and interface
names, disks), ``upper/`` and ``work/`` (the overlay's writable layer), ``root/`` (the mounted
overlay), ``console.log``, the supervisor's and nspawn's pid files and the ``power`` file
(``on`` | ``reboot`` | ``off``: what the host asked for). Power state is read from the live
processes, never from memory, so any process (the Nova driver, the tests, ``sandbox down``)
sees the same thing.

The sandbox's Nova driver calls these functions; they know nothing of Nova.

Modules: ``state`` (a guest's record, processes, power state, console), ``configdrive`` (the
first-boot seed), ``prepare`` (image, overlay, namespace), ``disks`` (loop devices, volumes),
``boot`` (start, reboot) and ``teardown`` (stop, destroy, cleanup); this package re-exports
their names. ``GUESTS_DIR`` lives here: the submodules read it at each call.
"""

from __future__ import annotations

from sandbox import layout
from sandbox.guests import cgroups, firewall, rootfs
from sandbox.guests.boot import reboot_guest, start_guest
from sandbox.guests.configdrive import SEED_DIR, instance_uuid, seed_files, write_seed
from sandbox.guests.disks import _plug_all, attach_volume, detach_volume
from sandbox.guests.prepare import install
from sandbox.guests.state import (
    FUSE_DEV,
    MAX_CONSOLE_BYTES,
    REBOOT_EXIT,
    GuestError,
    GuestSpec,
    _cmdline,
    _container_pid1,
    _kill,
    _load,
    _names,
    _netns_prefix,
    _nspawn_pid,
    _power_request,
    _set_power,
    _tag,
    console_output,
    list_guests,
    power_state,
)
from sandbox.guests.teardown import _our_processes, cleanup_all, destroy_guest, stop_guest

GUESTS_DIR = layout.STATE_DIR / "guests"

__all__ = [
    "FUSE_DEV",
    "GUESTS_DIR",
    "MAX_CONSOLE_BYTES",
    "REBOOT_EXIT",
    "SEED_DIR",
    "GuestError",
    "GuestSpec",
    "_cmdline",
    "_container_pid1",
    "_kill",
    "_load",
    "_names",
    "_netns_prefix",
    "_nspawn_pid",
    "_our_processes",
    "_plug_all",
    "_power_request",
    "_set_power",
    "_tag",
    "attach_volume",
    "cgroups",
    "cleanup_all",
    "console_output",
    "destroy_guest",
    "detach_volume",
    "firewall",
    "install",
    "instance_uuid",
    "list_guests",
    "power_state",
    "reboot_guest",
    "rootfs",
    "seed_files",
    "start_guest",
    "stop_guest",
    "write_seed",
]
