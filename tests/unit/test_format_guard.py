"""The format guard, run for real (as root, on files and an unbound loop device): it formats
only an empty device, under a lock, and refuses everything else naming why."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from core.errors import BootstrapError
from tasks.vm import LocalHost
from tasks.volume_fs import format_guarded

MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the guard takes a lock in /run")


def blank(path: Path, size: int = 8 * MIB) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


def poke(path: Path, offset: int, data: bytes = b"\xab" * 4096) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def msdos_label() -> bytes:
    """A sector with one Linux partition (LBA 2048, 4096 sectors) and the 0x55AA mark."""
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
    entry += (4096).to_bytes(4, "little")
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def refused(device: Path | str) -> str:
    with pytest.raises(BootstrapError) as err:
        format_guarded(LocalHost(), str(device), "pspace")
    return str(err.value)


def test_an_empty_device_is_formatted_once(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk")
    assert format_guarded(LocalHost(), str(disk), "pspace") == "formatted"
    uuid = subprocess.check_output(["blkid", "-p", "-o", "value", "-s", "UUID", str(disk)])
    assert format_guarded(LocalHost(), str(disk), "pspace") == "has ext4"
    assert subprocess.check_output(["blkid", "-p", "-o", "value", "-s", "UUID", str(disk)]) == uuid


def test_two_at_once_format_at_most_once(tmp_path: Path) -> None:
    disk = blank(tmp_path / "disk")
    outcomes: list[str] = []
    runs = [
        threading.Thread(
            target=lambda: outcomes.append(format_guarded(LocalHost(), str(disk), "x"))
        )
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted(outcomes) == ["formatted", "has ext4"]


def test_anything_but_an_empty_device_is_refused(tmp_path: Path) -> None:
    # a partition table
    mbr = blank(tmp_path / "mbr")
    poke(mbr, 0, msdos_label())
    assert "holds dos" in refused(mbr)
    # another filesystem
    xfs = blank(tmp_path / "ext2")
    subprocess.run(["mkfs.ext2", "-q", "-F", str(xfs)], check=True)
    assert "holds ext2" in refused(xfs)
    # no signature anywhere, but data in the first or the last MiB
    first = blank(tmp_path / "first")
    poke(first, 300 * 1024)
    assert "the first MiB of" in refused(first)
    last = blank(tmp_path / "last")
    poke(last, 8 * MIB - 8192)
    assert "the last MiB of" in refused(last)
    # not there, or a block device that reads nothing (blkid says "nothing found" for both)
    assert "is not a block device" in refused(tmp_path / "missing")
    unbound = subprocess.check_output(["losetup", "-f"], text=True).strip()
    assert subprocess.run(["blkid", "-p", unbound], capture_output=True).returncode == 2
    assert "cannot be read" in refused(unbound)
    for disk in (first, last):
        assert subprocess.run(["blkid", "-p", str(disk)], capture_output=True).returncode == 2
