"""A signed Debian package mirror for the guests, which have no internet.

The packages in ``packages.txt`` and their whole dependency closure (no recommends) are fetched
once on the host with the ordinary apt client and kept in the cache, keyed by the list. They are
indexed as a real repository (``dists/bookworm/main/binary-amd64/Packages(.gz)``, a Release
file with hashes, ``InRelease`` and ``Release.gpg`` signed with a sandbox key made once and
kept in the cache) and served over HTTP on the tenant gateway, where every guest reaches it:

    http://SERVICES_IP:MIRROR_PORT/debian  bookworm main

``prepare_guest(upper)`` gives a guest, before its first boot, a deb822 source for the mirror
and the key that signs it (``Signed-By``), and nothing else: its package lists stay empty until
it runs ``apt-get update``, as on a fresh cloud VM.

Faults (persisted in a JSON file, so any process sets them and the server sees them at once):
requests failing with HTTP 503 at a rate or for the next N requests, a delay per request, an
unsigned or tampered repository, and the dpkg lock held at a guest's first boot.

    from sandbox import mirror
    mirror.up()                                   # idempotent
    mirror.set_faults(fail_next=3, clients=["10.211.0.251"])
    mirror.set_faults(dpkg_lock_seconds=60)       # guests prepared from now on
    mirror.reset_faults()

Modules: ``common`` (constants, package list, build directory, URL), ``signing`` (the key and
the signatures), ``repository`` (fetch, index, sign), ``service`` (the server process;
``server`` is its code), ``faultfile`` (the faults) and ``guest`` (what a guest gets); this
package re-exports their names.
"""

from __future__ import annotations

from sandbox.mirror.common import (
    ARCH,
    COMPONENT,
    GNUPG_HOME,
    HEALTH_PATH,
    HOST_TOOLS,
    KEY_UID,
    KEYRING,
    LOG_FILE,
    MIRROR_DIR,
    ORIGIN,
    PID_FILE,
    PREFIX,
    SOURCE_DIR,
    SUITE,
    build_dir,
    packages,
    repo_dir,
    url,
)
from sandbox.mirror.faultfile import (
    DEFAULT_FAULTS,
    FAULTS_FILE,
    REPO_MODES,
    fault,
    faults,
    reset_faults,
    set_faults,
    take_failure,
)
from sandbox.mirror.guest import (
    GUEST_KEYRING,
    GUEST_SOURCES,
    LOCK_MARKER,
    LOCK_UNIT,
    lock_unit,
    prepare_guest,
    sources_text,
)
from sandbox.mirror.repository import build, install, ready
from sandbox.mirror.service import _alive, down, running, status, up
from sandbox.mirror.signing import ensure_key, fingerprint

__all__ = [
    "ARCH",
    "COMPONENT",
    "DEFAULT_FAULTS",
    "FAULTS_FILE",
    "GNUPG_HOME",
    "GUEST_KEYRING",
    "GUEST_SOURCES",
    "HEALTH_PATH",
    "HOST_TOOLS",
    "KEYRING",
    "KEY_UID",
    "LOCK_MARKER",
    "LOCK_UNIT",
    "LOG_FILE",
    "MIRROR_DIR",
    "ORIGIN",
    "PID_FILE",
    "PREFIX",
    "REPO_MODES",
    "SOURCE_DIR",
    "SUITE",
    "_alive",
    "build",
    "build_dir",
    "down",
    "ensure_key",
    "fault",
    "faults",
    "fingerprint",
    "install",
    "lock_unit",
    "packages",
    "prepare_guest",
    "ready",
    "repo_dir",
    "reset_faults",
    "running",
    "set_faults",
    "sources_text",
    "status",
    "take_failure",
    "up",
    "url",
]
