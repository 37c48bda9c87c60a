"""Powering a guest off and removing it: stop, release (mounts, loop devices, namespace),
destroy, and the cleanup of everything of a guests directory, a crashed run's included."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from sandbox.guests import cgroups
from sandbox.guests.disks import _detach_loops
from sandbox.guests.state import (
    _cmdline,
    _container_pid1,
    _dir,
    _guest_lock,
    _kill,
    _load,
    _loop_lock,
    _mounted,
    _names,
    _netns_prefix,
    _nspawn_pid,
    _run,
    _save,
    _set_power,
    _supervisor_pid,
    _tag,
    _wait_gone,
    guests_dir,
    list_guests,
)


def stop_guest(name: str, timeout: float = 30) -> None:
    """Power off: a clean shutdown, then a kill. The overlay and the disk records stay."""
    d = _dir(name)
    if not (d / "guest.json").exists():
        return
    _set_power(name, "off")
    # One SIGTERM reaches nspawn, which then asks the guest's systemd to power off (a second
    # one would make nspawn kill the guest at once). The supervisor passes it on.
    supervisor = _supervisor_pid(name)
    _kill(supervisor or _nspawn_pid(name), signal.SIGTERM)
    if not _wait_gone(lambda: _nspawn_pid(name), timeout):
        _kill(_container_pid1(name), signal.SIGKILL)  # ends the guest's whole pid namespace
        _kill(_nspawn_pid(name), signal.SIGKILL)
        _wait_gone(lambda: _nspawn_pid(name), 5)
    if not _wait_gone(lambda: _supervisor_pid(name), 5):
        _kill(_supervisor_pid(name), signal.SIGKILL)
        _wait_gone(lambda: _supervisor_pid(name), 2)
    (d / "nspawn.pid").unlink(missing_ok=True)


def _release(name: str) -> None:
    """Unmount, free loop devices and remove the namespace (the guest must be stopped)."""
    d = _dir(name)
    root = d / "root"
    for _ in range(3):
        if not _mounted(root):
            break
        _run("umount", "-R", str(root), check=False)
        if _mounted(root):
            _run("umount", "-l", str(root), check=False)
    names = _names(name)
    if (d / "guest.json").exists():
        with _guest_lock(name):
            data = _load(name)
            names = data["names"]
            for disk in data["disks"]:
                _detach_loops(disk["path"])
                disk["loop"] = None
            _save(name, data)
    if Path(f"/run/netns/{names['netns']}").exists():
        _run("ip", "netns", "del", names["netns"], check=False)
    _run("ip", "link", "del", names["veth"], check=False)
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{names['machine']}", ignore_errors=True)
    cgroups.remove(_tag(), name)


def destroy_guest(name: str) -> None:
    """Power off and remove everything of the guest. Volume files (Cinder's) stay."""
    d = _dir(name)
    if not d.exists():
        return
    stop_guest(name, timeout=10)
    _release(name)
    shutil.rmtree(d, ignore_errors=True)


def _our_processes() -> list[int]:
    """Supervisors and nspawn processes of this guests directory (also from a crashed run)."""
    marker = str(guests_dir()) + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = _cmdline(int(entry.name))
        is_ours = (
            "sandbox.guests.supervisor" in argv or (argv and argv[0].endswith("systemd-nspawn"))
        ) and any(arg.startswith(marker) for arg in argv)
        if is_ours:
            pids.append(int(entry.name))
    return pids


def cleanup_all() -> None:
    """Stop every guest; remove every namespace, veth, overlay mount and loop device of ours.

    Guest directories (their disk state) stay, so guests can be powered on again; power_state
    then says ``shutdown``. Also clears what a crashed run left behind.
    """
    for name in list_guests():
        with contextlib.suppress(Exception):
            stop_guest(name, timeout=15)
        with contextlib.suppress(Exception):
            _release(name)
    # leftovers: processes, mounts, loop devices and namespaces with no (readable) record
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _our_processes()
        for pid in pids:
            _kill(pid, sig)
        _wait_gone(lambda: _our_processes(), 5)
    marker = str(guests_dir()) + "/"
    with contextlib.suppress(OSError):
        mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mnt in reversed(mounts):
            if mnt.startswith(marker):
                _run("umount", "-l", mnt, check=False)
    with _loop_lock():
        out = _run("losetup", "-n", "-l", "-O", "NAME,BACK-FILE", check=False).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].strip().startswith(marker):
                _run("losetup", "-d", parts[0], check=False)
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(_netns_prefix()):
            _run("ip", "netns", "del", ns, check=False)
    cgroups.remove_all(_tag())
