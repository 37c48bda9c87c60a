"""The guests' golden root filesystem: Debian bookworm made to hold what Ubuntu's server cloud
image holds (systemd, sshd, sudo, python3 without venv or pip, cloud-init, unattended-upgrades).

Built once with debootstrap from the machine's own Debian mirror and kept under
``$CACHE_DIR/rootfs/<key>``, where the key is a hash of everything in ``sandbox/rootfs/`` (the
package list, the customisation script, the boot unit); rebuilt when any of them changes. Guests
boot it read-only through overlayfs, so each guest costs only its own changes. Never in git.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sandbox import layout, locks

SOURCE_DIR = Path(__file__).resolve().parents[1] / "rootfs"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Files of SOURCE_DIR that define the build (all of them go into the cache key).
FILES = ("packages.txt", "customise.sh", "sandbox-disks", "sandbox-disks.service", "cloud-init.cfg")


def packages() -> list[str]:
    text = (SOURCE_DIR / "packages.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def mirror() -> str:
    """The main Debian archive the host's apt uses (deb822 or one-line sources)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if path.suffix not in (".list", ".sources"):
            continue
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                uris = (
                    words[1:]
                    if words[:1] == ["URIs:"]
                    else words[1:2]
                    if words[:1] == ["deb"]
                    else []
                )
                for uri in uris:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
    return DEFAULT_MIRROR


def build_key() -> str:
    digest = hashlib.sha256(SUITE.encode())
    for name in FILES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def rootfs_dir() -> Path:
    return layout.CACHE_DIR / "rootfs" / build_key()


def ready() -> bool:
    return (rootfs_dir() / ".complete").exists()


def _build_lock() -> contextlib.AbstractContextManager[None]:
    return locks.flock(layout.CACHE_DIR / "rootfs" / ".lock")


def _in_use(path: Path) -> bool:
    """True when an overlay is mounted on this build or a guest was created from it."""
    try:
        if f"lowerdir={path}," in Path("/proc/self/mountinfo").read_text():
            return True
        records = (layout.STATE_DIR / "guests").glob("*/guest.json")
        return any(f'"{path}"' in record.read_text() for record in records)
    except OSError:
        return True


def build(log: Callable[[str], object] = print) -> Path:
    """Build the rootfs if this key has none yet (about a minute on 2 cores). Returns its path."""
    target = rootfs_dir()
    if ready():
        return target
    with _build_lock():
        if ready():  # built by someone else while this process waited
            return target
        tmp = target.with_name(target.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        pkgs = packages()
        log(f"building the guest root filesystem ({len(pkgs)} packages, debootstrap)")
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(pkgs)}"]
        _check([*cmd, SUITE, str(tmp), mirror()])
        (tmp / "usr/local/sbin").mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCE_DIR / "sandbox-disks", tmp / "usr/local/sbin/sandbox-disks")
        shutil.copy(
            SOURCE_DIR / "sandbox-disks.service", tmp / "etc/systemd/system/sandbox-disks.service"
        )
        shutil.copy(SOURCE_DIR / "cloud-init.cfg", tmp / "etc/cloud/cloud.cfg.d/90_sandbox.cfg")
        shutil.copy(SOURCE_DIR / "customise.sh", tmp / "tmp/customise.sh")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
        _check(["chroot", str(tmp), "/bin/sh", "/tmp/customise.sh"], env=env)
        (tmp / "tmp/customise.sh").unlink()
        (tmp / ".complete").write_text(build_key() + "\n")
        tmp.rename(target)
        for old in target.parent.iterdir():  # older builds, once no guest boots from them
            if old.is_dir() and old.name != target.name and not _in_use(old):
                shutil.rmtree(old, ignore_errors=True)
        log(f"guest root filesystem ready in {time.monotonic() - t0:.0f} s: {target}")
        return target


def _check(argv: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(argv[:3])} … failed ({proc.returncode}): {tail}")


if __name__ == "__main__":  # python -m sandbox.guests.rootfs: build now
    os.umask(0o022)
    build()
