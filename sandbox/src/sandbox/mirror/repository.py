"""Fetching the packages with the host's apt and indexing them as a signed repository, with a
tampered copy beside it for the ``repo="tampered"`` fault."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandbox.mirror.common import (
    ARCH,
    COMPONENT,
    GNUPG_HOME,
    HOST_TOOLS,
    MIRROR_DIR,
    ORIGIN,
    PREFIX,
    SUITE,
    _key,
    _lock,
    _log,
    _run,
    build_dir,
    packages,
)
from sandbox.mirror.signing import _sign, ensure_key, fingerprint


# -- host tools and the signing key -----------------------------------------------------------
def install() -> None:
    """Host tools (apt-utils, gnupg, dpkg-dev), the signing key and the mirror itself."""
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if missing:
        _log(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            _run(cmd, env=env)
    build(log=_log)


# -- fetching and indexing --------------------------------------------------------------------
def _closure(requested: list[str]) -> list[str]:
    """Every real package the requested ones need (Depends and Pre-Depends, recursively; all
    alternatives), as the host's apt sees them."""
    out = _run(
        [
            "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
            "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *requested,
        ]
    ).stdout  # fmt: skip
    names = {
        line.strip()
        for line in out.splitlines()
        if line and not line[0].isspace() and not line.startswith("<") and ":" not in line
    }
    # pure virtual names have no record: keep the packages apt can actually download
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *sorted(names)], capture_output=True, text=True
    ).stdout
    return sorted({line.split()[1] for line in shown.splitlines() if line.startswith("Package: ")})


def _fetch(pool: Path, log: Callable[[str], object]) -> int:
    requested = packages()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        names = _closure(requested)
    except RuntimeError:
        names = []
    if not set(requested) <= set(names):  # the host's package lists are missing or stale
        log("apt-get update (the host's package lists lack some of the mirror's packages)")
        _run(["apt-get", "update", "-q"], env=env)
        names = _closure(requested)
    missing = sorted(set(requested) - set(names))
    if missing:
        raise RuntimeError(f"the host's apt knows no package {', '.join(missing)}")
    log(f"fetching {len(names)} packages for the guests' mirror with apt-get download")
    pool.mkdir(parents=True, exist_ok=True)
    os.chmod(pool, 0o755)
    # apt's download method runs as _apt when it can write the directory
    with contextlib.suppress(KeyError, OSError):
        import pwd

        os.chown(pool, pwd.getpwnam("_apt").pw_uid, 0)
    _run(["apt-get", "download", "-q", *names], cwd=pool, env=env)
    os.chown(pool, 0, 0)
    return len(names)


def _release(dist: Path) -> str:
    """A Release file for ``dist`` (hashes of every index below it)."""
    opts = {
        "Origin": ORIGIN,
        "Label": ORIGIN,
        "Suite": SUITE,
        "Codename": SUITE,
        "Architectures": ARCH,
        "Components": COMPONENT,
        "Description": "sails sandbox package mirror",
    }
    argv = ["apt-ftparchive"]
    for name, value in opts.items():
        argv += ["-o", f"APT::FTPArchive::Release::{name}={value}"]
    return _run([*argv, "release", "."], cwd=dist).stdout


def _write_indexes(dist: Path, packages_text: str) -> None:
    binary = dist / COMPONENT / f"binary-{ARCH}"
    binary.mkdir(parents=True, exist_ok=True)
    (binary / "Packages").write_text(packages_text)
    with (
        open(binary / "Packages.gz", "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
    ):
        gz.write(packages_text.encode())
    for name in ("Release", "InRelease", "Release.gpg"):
        (dist / name).unlink(missing_ok=True)
    release = _release(dist)
    (dist / "Release").write_text(release)


def _tampered(build: Path, packages_text: str) -> None:
    """The same repository with one package's checksum changed and the Release hashes redone,
    still carrying the original signatures (which no longer match), as a mirror an attacker
    changed would look."""
    dist = build / "tampered" / PREFIX / "dists" / SUITE
    shutil.rmtree(dist, ignore_errors=True)
    changed, done = [], False
    for line in packages_text.splitlines(keepends=True):
        if not done and line.startswith("SHA256: "):
            line = f"SHA256: {hashlib.sha256(b'tampered').hexdigest()}\n"
            done = True
        changed.append(line)
    _write_indexes(dist, "".join(changed))
    original = build / PREFIX / "dists" / SUITE
    head, rest = (original / "InRelease").read_text().split("\n\n", 1)
    signature = rest[rest.index("-----BEGIN PGP SIGNATURE-----") :]
    (dist / "InRelease").write_text(f"{head}\n\n{(dist / 'Release').read_text()}{signature}")
    shutil.copy(original / "Release.gpg", dist / "Release.gpg")


def _index(build: Path, fpr: str) -> None:
    repo = build / PREFIX
    dist = repo / "dists" / SUITE
    packages_text = _run(["apt-ftparchive", "packages", f"pool/{COMPONENT}"], cwd=repo).stdout
    if "Package: " not in packages_text:
        raise RuntimeError(f"no packages under {repo}/pool/{COMPONENT}")
    _write_indexes(dist, packages_text)
    _sign(dist, fpr)
    _tampered(build, packages_text)
    (build / ".signed-by").write_text(f"{fpr}\n")


def ready() -> bool:
    build = build_dir()
    try:
        signed_by = (build / ".signed-by").read_text().strip()
    except OSError:
        return False
    return (build / ".complete").exists() and signed_by == fingerprint()


def build(log: Callable[[str], object] = print) -> Path:
    """Fetch (once per package list) and index and sign the repository; returns the document
    root the server serves. A repository signed by a key that is no longer the sandbox's is
    signed again; the packages are not fetched again."""
    target = build_dir()
    if ready():
        return target
    ensure_key()
    fpr = fingerprint() or ""
    with _lock(".build.lock"):
        if ready():
            return target
        t0 = time.monotonic()
        pool = target / PREFIX / "pool" / COMPONENT
        if not (target / ".fetched").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=MIRROR_DIR))
            try:
                count = _fetch(tmp, log)
                shutil.rmtree(pool, ignore_errors=True)
                pool.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(pool)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            (target / ".fetched").write_text(f"{count}\n")
        _index(target, fpr)
        (target / ".complete").write_text(f"{_key()}\n")
        for old in MIRROR_DIR.iterdir():  # builds of older package lists
            if old.is_dir() and old != target and len(old.name) == 12 and old != GNUPG_HOME:
                shutil.rmtree(old, ignore_errors=True)
        debs = len(list(pool.glob("*.deb")))
        log(f"guests' package mirror: {debs} packages indexed and signed in "
            f"{time.monotonic() - t0:.0f} s: {target}")  # fmt: skip
        return target
