"""A guest's block devices: loop devices for its disk files, plugged as /dev/vdX with their
/dev/disk/by-id links, and volumes attached and detached while it runs."""

from __future__ import annotations

import contextlib
import os
import sys

from sandbox.guests.state import (
    GuestError,
    _container_pid1,
    _dir,
    _guest_lock,
    _load,
    _loop_lock,
    _mounted,
    _run,
    _save,
)


def _losetup(path: str) -> str:
    """The loop device backing ``path`` (an existing one is reused)."""
    with _loop_lock():
        found = _run("losetup", "-j", path, check=False).stdout.strip()
        if found:
            return found.split(":", 1)[0]
        return _run("losetup", "--find", "--show", path).stdout.strip()


def _devno(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _disks_file(disks: list[dict]) -> str:
    lines = []
    for disk in disks:
        if not disk.get("loop"):
            continue
        major, minor = _devno(disk["loop"])
        serial = disk["serial"][:20] if disk["serial"] != "-" else "-"
        lines.append(f"{disk['dev']} {major} {minor} {serial}")
    return "".join(line + "\n" for line in lines)


def _write_disks_file(name: str, disks: list[dict]) -> None:
    root = _dir(name) / "root"
    if _mounted(root):
        (root / "etc/sandbox-disks").write_text(_disks_file(disks))


def _plug_all(name: str) -> list[dict]:
    """Loop devices for every recorded disk, and the list the guest's boot unit reads."""
    with _guest_lock(name):
        data = _load(name)
        for disk in data["disks"]:
            try:
                disk["loop"] = _losetup(disk["path"])
            except GuestError as exc:  # e.g. the volume file is gone: the others still plug
                print(f"guest {name}: {disk['dev']} not plugged: {exc}", file=sys.stderr)
                disk["loop"] = None
        _save(name, data)
        _write_disks_file(name, data["disks"])
    return data["disks"]


def _detach_loops(path: str) -> None:
    with _loop_lock():
        for line in _run("losetup", "-j", path, check=False).stdout.splitlines():
            _run("losetup", "-d", line.split(":", 1)[0], check=False)


# -- volumes -----------------------------------------------------------------------------------
def _guest_sh(name: str, script: str) -> bool:
    """Run a shell script in the running guest's mount namespace; False if it is not running."""
    pid1 = _container_pid1(name)
    if pid1 is None:
        return False
    _run("nsenter", "-t", str(pid1), "-m", "--", "/bin/sh", "-c", script)
    return True


def _plug_script(dev: str, loop: str, serial: str) -> str:
    major, minor = _devno(loop)
    link = f"ln -sfn ../../{dev} /dev/disk/by-id/virtio-{serial[:20]}; " if serial != "-" else ""
    return (
        f"set -e; [ -b /dev/{dev} ] || "
        f"{{ rm -f /dev/{dev}; mknod /dev/{dev} b {major} {minor}; }}; "
        f"chmod 0660 /dev/{dev}; chgrp disk /dev/{dev} 2>/dev/null || true; "
        f"mkdir -p /dev/disk/by-id /dev/disk/by-uuid; {link}"
        f"if mountpoint -q /sys/block; then ln -sfn "
        f'"$(readlink -f /sys/dev/block/{major}:{minor})" /sys/block/{dev} || true; fi; '
        f"u=$(blkid -p -s UUID -o value /dev/{dev} 2>/dev/null || true); "
        f'[ -z "$u" ] || ln -sfn ../../{dev} "/dev/disk/by-uuid/$u"'
    )


def attach_volume(name: str, path: str, serial: str) -> str:
    """Plug a volume file into the guest as the next free /dev/vdX and return that name.

    The device also appears as /dev/disk/by-id/virtio-<serial[:20]>. The attachment is recorded,
    so every later boot plugs it again. Attaching the same serial again returns its device.
    """
    if not (_dir(name) / "guest.json").exists():
        raise GuestError(f"no guest {name}")
    with _guest_lock(name):
        data = _load(name)
        disk = next((x for x in data["disks"] if x["serial"] == serial), None)
        if disk is None:
            used = {x["dev"] for x in data["disks"]} | {"vda"}
            dev = next(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used)
            disk = {"dev": dev, "path": str(path), "serial": serial, "ephemeral": False}
            data["disks"].append(disk)
        disk["loop"] = _losetup(disk["path"])
        _save(name, data)
        _write_disks_file(name, data["disks"])
        _guest_sh(name, _plug_script(disk["dev"], disk["loop"], serial))
    return f"/dev/{disk['dev']}"


def detach_volume(name: str, serial: str) -> None:
    """Unplug the volume's node and links from the guest and free its loop device. Idempotent."""
    if not (_dir(name) / "guest.json").exists():
        return
    with _guest_lock(name):
        data = _load(name)
        gone = [x for x in data["disks"] if x["serial"] == serial and not x.get("ephemeral")]
        data["disks"] = [x for x in data["disks"] if x not in gone]
        _save(name, data)
        _write_disks_file(name, data["disks"])
        for disk in gone:
            dev = disk["dev"]
            with contextlib.suppress(GuestError):
                _guest_sh(
                    name,
                    "for l in /dev/disk/by-id/* /dev/disk/by-uuid/*; do "
                    f'[ "$(readlink "$l")" = ../../{dev} ] && rm -f "$l"; done; '
                    f"rm -f /dev/{dev}; ! mountpoint -q /sys/block || rm -f /sys/block/{dev}",
                )
            _detach_loops(disk["path"])
