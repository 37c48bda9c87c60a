"""The data volume inside the guest: its device found by serial, formatted only when empty
(FORMAT_GUARD), mounted by UUID from fstab and handed to its owner."""

from __future__ import annotations

import shlex

from core.config import BootstrapConfig
from core.errors import BootstrapError, RemoteCommandError
from core.log import logger
from core.poll import poll
from core.records import Action
from tasks.vm import MANAGED, VM, StepRecord, planned

#: The one command that may format the data volume, run as root on the VM: under a lock (two
#: configures format at most once), and only a device that reads, where blkid finds nothing and
#: reports no error (it exits 2 for "nothing found" and for "could not open" alike), where wipefs
#: lists no signature, and whose first and last MiB are zeros. Prints one line: "formatted",
#: "has ext4" (someone else formatted it meanwhile) or "refuse: WHY" (exit 3).
FORMAT_GUARD = r"""
dev="$1"; label="$2"; mib=1048576
exec 9>/run/sails-format.lock
flock -w 600 9 || { echo "refuse: another format of a volume is still running"; exit 3; }
[ -b "$dev" ] || [ -f "$dev" ] || { echo "refuse: $dev is not a block device"; exit 3; }
[ "$(dd if="$dev" bs=4096 count=1 2>/dev/null | wc -c)" -eq 4096 ] || {
  echo "refuse: $dev cannot be read"; exit 3; }
found=$(blkid -p -o export "$dev" 2>&1); rc=$?
if [ $rc -eq 0 ]; then
  kind=$(printf '%s\n' "$found" | sed -n 's/^\(TYPE\|PTTYPE\)=//p' | head -n 1)
  [ "$kind" = ext4 ] && { echo "has ext4"; exit 0; }
  echo "refuse: $dev holds ${kind:-a signature blkid names no type for}"; exit 3
fi
[ $rc -eq 2 ] && [ -z "$found" ] || { echo "refuse: blkid failed ($rc): $found"; exit 3; }
sigs=$(wipefs --no-act --noheadings "$dev" 2>&1) || { echo "refuse: wipefs failed: $sigs"; exit 3; }
[ -z "$sigs" ] || { echo "refuse: wipefs finds signatures: $sigs"; exit 3; }
size=$(blockdev --getsize64 "$dev" 2>/dev/null || stat -c %s "$dev")
[ "$size" -ge $((2 * mib)) ] || { echo "refuse: $dev is smaller than 2 MiB"; exit 3; }
cmp -s -n $mib "$dev" /dev/zero || { echo "refuse: the first MiB of $dev is not empty"; exit 3; }
cmp -s -n $mib -i $((size - mib)):0 "$dev" /dev/zero || {
  echo "refuse: the last MiB of $dev is not empty"; exit 3; }
mkfs.ext4 -q -F -L "$label" "$dev" || { echo "refuse: mkfs.ext4 failed"; exit 3; }
echo formatted
"""


def format_guarded(vm: VM, device: str, label: str) -> str:
    """Run FORMAT_GUARD on ``device``: "formatted" or "has ext4"; a refusal is a BootstrapError
    naming why."""
    r = vm.run(
        f"sh -c {shlex.quote(FORMAT_GUARD)} sails-format {shlex.quote(device)} "
        f"{shlex.quote(label)}",
        sudo=True,
        check=False,
        timeout=900,
    )
    out = (r.stdout.strip().splitlines() or [""])[-1]
    if r.code == 0 and out in ("formatted", "has ext4"):
        return out
    why = out.removeprefix("refuse: ") or (r.stderr.strip()[-300:] or f"exit {r.code}")
    raise BootstrapError(
        f"refusing to format {device}: {why}. A data volume is formatted only when it is empty "
        "(no signature, zeros at both ends): look at it by hand (`sudo wipefs --no-act "
        f"{device}`), or attach another volume"
    )


def _blkid(vm: VM, device: str) -> dict[str, str]:
    q = shlex.quote(device)
    read = vm.run(f"dd if={q} bs=4096 count=1 2>/dev/null | wc -c", sudo=True, check=False)
    if read.stdout.strip() != "4096":
        raise BootstrapError(f"{device} cannot be read; check the volume's attachment")
    r = vm.run(f"blkid -p -o export {q}", sudo=True, check=False)
    if r.code == 2 and not (r.stdout + r.stderr).strip():  # nothing found, nothing wrong
        return {}
    if not r.ok:
        raise RemoteCommandError(f"blkid on {device} failed ({r.code}): {r.stderr.strip()}")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def resolve_device(vm: VM, volume_id: str, timeout: float = 60) -> str:
    """The guest's device for the volume, found by its serial (never by Nova's name)."""
    candidates = [
        f"/dev/disk/by-id/virtio-{volume_id[:20]}",
        f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{volume_id[:20]}",
        f"/dev/disk/by-id/virtio-{volume_id}",
    ]
    probe = " ".join(shlex.quote(c) for c in candidates)
    found = poll(
        lambda: vm.run(
            f'for d in {probe}; do [ -e "$d" ] && readlink -f "$d" && exit 0; done; exit 1',
            check=False,
        ),
        lambda r: r.ok and bool(r.stdout.strip()),
        f"volume {volume_id[:8]} to appear in the guest",
        timeout,
        interval=1,
        timed_out=lambda _: BootstrapError(
            f"volume {volume_id} is attached but no device with its serial appeared in the "
            f"guest within {timeout:.0f} s (looked for {candidates[0]})"
        ),
    )
    return str(found.stdout.strip().splitlines()[0])


class MountRecord(StepRecord):
    """The data volume's filesystem: the device it is on and its UUID (the fstab key)."""

    device: str = ""
    uuid: str | None = None


def ensure_volume_mounted(
    vm: VM,
    config: BootstrapConfig,
    volume_id: str,
    apply: bool = True,
    recorded_uuid: str | None = None,
) -> MountRecord:
    """Format only an empty volume that was never formatted before (``recorded_uuid``: what the
    volume's metadata says was made there), mount it by UUID from fstab, hand it to the owner."""
    log = logger()
    mp, owner = config.volume.mount_point, config.volume.owner
    device = resolve_device(vm, volume_id)
    changes: list[str] = []
    probe = _blkid(vm, device)
    if recorded_uuid and not probe:
        raise BootstrapError(
            f"volume {volume_id} ({device}) was formatted before (filesystem {recorded_uuid}, "
            "recorded on the volume) but now reads as empty; refusing to format it again. Check "
            "that the right volume is attached and look at it by hand (`sudo wipefs --no-act "
            f"{device}`, `sudo file -s {device}`); if its data is truly gone, remove the "
            "volume's 'sails-bootstrap-fs-uuid' metadata key and run again"
        )
    if probe.get("PTTYPE"):
        raise BootstrapError(
            f"volume {volume_id} ({device}) holds a {probe['PTTYPE']} partition table; refusing "
            "to format it. Mount or wipe it by hand, or attach another volume"
        )
    fstype = probe.get("TYPE")
    if fstype and fstype != "ext4":
        raise BootstrapError(
            f"volume {volume_id} ({device}) holds a {fstype} filesystem, not ext4; refusing to "
            "format it. Copy its data off and wipe it, or attach another volume"
        )
    if not fstype and not apply:
        return MountRecord(
            name=f"volume at {mp}",
            action=Action.CHANGE,
            applied=False,
            reason=(
                f"pending: format {device} ext4 (it holds no filesystem), add it to fstab by UUID, "
                f"mount it at {mp} and hand it to {owner}"
            ),
            device=device,
        )
    if not fstype:
        if format_guarded(vm, device, config.volume.label) == "formatted":
            changes.append(f"formatted {device} ext4 (it held no filesystem)")
        probe = _blkid(vm, device)
        if probe.get("TYPE") != "ext4":
            raise BootstrapError(
                f"volume {volume_id} ({device}) was formatted meanwhile as "
                f"{probe.get('TYPE') or probe.get('PTTYPE') or 'something unknown'}, not ext4; "
                "refusing to use it"
            )
    uuid = probe["UUID"]
    parent = mp.rsplit("/", 1)[0] or "/"
    line = (
        f"UUID={uuid} {mp} ext4 defaults,nofail,x-systemd.requires-mounts-for={parent} 0 2"
        f" {MANAGED}"
    )
    fstab = vm.run("cat /etc/fstab", check=False).stdout.splitlines()
    others = [entry for entry in fstab if entry.split()[1:2] != [mp] or entry.startswith("#")]
    if line not in fstab:
        changes.append("fstab entry by UUID")
        vm.write_file("/etc/fstab", "\n".join([*others, line]) + "\n", apply=apply)
    source = vm.run(f"findmnt -n -o SOURCE --mountpoint {shlex.quote(mp)}", check=False)
    mounted_from = source.stdout.strip() if source.ok else ""
    if mounted_from:
        real = vm.run(f"readlink -f {shlex.quote(mounted_from)}", check=False).stdout.strip()
        if real != device:
            raise BootstrapError(
                f"{mp} is already mounted from {mounted_from}, not from volume {volume_id} "
                f"({device}); unmount it first"
            )
    else:
        if apply:
            vm.run(f"mkdir -p {shlex.quote(mp)} && mount {shlex.quote(mp)}", sudo=True)
        changes.append(f"mounted at {mp}")
    # Not mounted (plan mode): the owner that counts is the volume's, known once it is mounted.
    if apply or mounted_from:
        own = vm.run(f"stat -c %U:%G {shlex.quote(mp)}").stdout.strip()
        if own != f"{owner}:{owner}":
            if apply:
                vm.run(f"chown {owner}:{owner} {shlex.quote(mp)}", sudo=True)
            changes.append(f"owner {own} -> {owner}")
    if changes and apply:
        log.info("volume: %s", "; ".join(changes))
    return MountRecord(
        name=f"volume at {mp}",
        id=uuid,
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or f"ext4 {device} mounted at {mp}, owned by {owner}",
        device=device,
        uuid=uuid,
    )
