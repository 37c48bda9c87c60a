"""What the mirror holds and where: its constants, the package list, the build directory of
that list and the URL the guests use."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from sandbox import layout, locks

SOURCE_DIR = Path(__file__).resolve().parent
SUITE = "bookworm"
COMPONENT = "main"
ARCH = "amd64"
ORIGIN = "sails-sandbox"
#: The path of the repository in the mirror's URLs.
PREFIX = "debian"
#: Host tools, by program, and the Debian package that brings each.
HOST_TOOLS = {"apt-ftparchive": "apt-utils", "gpg": "gnupg", "dpkg-scanpackages": "dpkg-dev"}

MIRROR_DIR = layout.CACHE_DIR / "mirror"
GNUPG_HOME = MIRROR_DIR / "gnupg"
KEYRING = MIRROR_DIR / "sails-sandbox.gpg"
KEY_UID = "sails sandbox package mirror <mirror@sails-sandbox.invalid>"
PID_FILE = layout.STATE_DIR / "run" / "mirror.pid"
LOG_FILE = layout.STATE_DIR / "logs" / "mirror.log"
#: A path the server answers without faults: up() and status() probe it.
HEALTH_PATH = "/_sandbox/health"


def _log(msg: str) -> None:
    print(f"[sandbox.mirror] {msg}", flush=True)


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:].strip()
        raise RuntimeError(f"{' '.join(argv[:4])} … failed ({proc.returncode}): {tail}")
    return proc


# -- what the mirror holds --------------------------------------------------------------------
def packages() -> list[str]:
    """The requested packages (the mirror also holds their dependencies)."""
    text = (SOURCE_DIR / "packages.txt").read_text()
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def _key() -> str:
    text = "\n".join([SUITE, COMPONENT, ARCH, *sorted(set(packages()))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_dir() -> Path:
    """The cached build for the current package list (the server's document root)."""
    return MIRROR_DIR / _key()


def repo_dir() -> Path:
    return build_dir() / PREFIX


def url() -> str:
    return f"http://{layout.SERVICES_IP}:{layout.MIRROR_PORT}/{PREFIX}"


def _lock(name: str) -> contextlib.AbstractContextManager[None]:
    return locks.flock(MIRROR_DIR / name)
