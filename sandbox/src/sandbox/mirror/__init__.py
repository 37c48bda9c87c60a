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
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sandbox import layout, locks, net

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
FAULTS_FILE = layout.STATE_DIR / "mirror" / "faults.json"
#: A path the server answers without faults: up() and status() probe it.
HEALTH_PATH = "/_sandbox/health"

#: What a guest gets (paths inside the guest).
GUEST_SOURCES = "etc/apt/sources.list.d/sandbox.sources"
GUEST_KEYRING = "etc/apt/keyrings/sails-sandbox.gpg"
LOCK_UNIT = "sails-sandbox-dpkg-lock.service"
LOCK_MARKER = "/var/lib/sails-sandbox/dpkg-lock-held"

DEFAULT_FAULTS: dict[str, Any] = {
    "fail_rate": 0.0,  # share of requests answered with fail_status
    "fail_next": 0,  # the next N requests are answered with fail_status
    "fail_status": 503,
    "delay": 0.0,  # seconds before every answer
    "repo": "signed",  # "signed" | "unsigned" (no InRelease/Release.gpg) | "tampered"
    "clients": None,  # None: every client; else only these client IPs meet the HTTP faults
    "dpkg_lock_seconds": 0.0,  # >0: guests prepared now hold the dpkg lock at first boot
    "dpkg_lock_guests": None,  # None: every guest; else only guests of these names
}
REPO_MODES = ("signed", "unsigned", "tampered")


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


def sources_text() -> str:
    """The deb822 source a guest gets (``Signed-By``: no ``trusted=yes``)."""
    return (
        "Types: deb\n"
        f"URIs: {url()}\n"
        f"Suites: {SUITE}\n"
        f"Components: {COMPONENT}\n"
        f"Signed-By: /{GUEST_KEYRING}\n"
    )


def _lock(name: str) -> contextlib.AbstractContextManager[None]:
    return locks.flock(MIRROR_DIR / name)


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


def _gpg(*args: str) -> subprocess.CompletedProcess[str]:
    return _run(["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--no-tty", *args])


def _stop_agent() -> None:
    """gpg starts an agent for the key; it is not needed between builds."""
    subprocess.run(["gpgconf", "--homedir", str(GNUPG_HOME), "--kill", "all"], capture_output=True)


def fingerprint() -> str | None:
    if not GNUPG_HOME.exists():
        return None
    out = subprocess.run(
        ["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--with-colons", "--list-keys"],
        capture_output=True,
        text=True,
    ).stdout
    fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
    return fprs[0] if fprs else None


def ensure_key() -> Path:
    """The sandbox's signing key (made once, kept in the cache) and its public keyring, which
    guests get as the source's ``Signed-By``. Returns the keyring path."""
    with _lock(".key.lock"):
        if fingerprint() is None:
            shutil.rmtree(GNUPG_HOME, ignore_errors=True)
            GNUPG_HOME.mkdir(parents=True, mode=0o700)
            try:
                _gpg("--passphrase", "", "--quick-gen-key", KEY_UID, "ed25519", "sign", "never")
            finally:
                _stop_agent()
            KEYRING.unlink(missing_ok=True)
        fpr = fingerprint()
        stamp = KEYRING.with_suffix(".fpr")
        if not KEYRING.exists() or not stamp.exists() or stamp.read_text().strip() != fpr:
            exported = subprocess.run(
                ["gpg", "--homedir", str(GNUPG_HOME), "--batch", "--export", str(fpr)],
                capture_output=True,
                check=True,
            ).stdout
            tmp = KEYRING.with_name(f".{KEYRING.name}.{os.getpid()}")
            tmp.write_bytes(exported)
            tmp.chmod(0o644)
            tmp.replace(KEYRING)
            stamp.write_text(f"{fpr}\n")
    return KEYRING


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


def _sign(dist: Path, fpr: str) -> None:
    try:
        common = ["--pinentry-mode", "loopback", "--passphrase", "", "--local-user", fpr, "--yes"]
        _gpg(*common, "--digest-algo", "SHA512", "--clearsign", "-o", str(dist / "InRelease"),
             str(dist / "Release"))  # fmt: skip
        _gpg(*common, "--digest-algo", "SHA512", "--armor", "--detach-sign",
             "-o", str(dist / "Release.gpg"), str(dist / "Release"))  # fmt: skip
    finally:
        _stop_agent()


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


# -- the server process -----------------------------------------------------------------------
def _alive() -> int | None:
    """The mirror's server process (checked by its command line, not just the pid)."""
    try:
        pid = int(PID_FILE.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"sandbox.mirror.server" in cmdline else None


def _health() -> str | None:
    """The document root the running server reports, or None when nothing answers."""
    health = f"http://{layout.SERVICES_IP}:{layout.MIRROR_PORT}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(health, timeout=2) as r:
            return r.read().decode().strip() if r.status == 200 else None
    except OSError:
        return None


def running() -> bool:
    return _health() is not None


def up() -> str:
    """Serve the mirror on the tenant gateway (idempotent, quick when it already serves the
    current build); returns its URL."""
    served = build_dir() if ready() else build(log=_log)
    if _alive() and _health() == str(served):
        return url()
    with _lock(".up.lock"):  # one starter at a time (the sandbox's up(), a test fixture)
        if not (_alive() and _health() == str(served)):
            _start(served)
    return url()


def _start(served: Path) -> None:
    net.ensure_network()
    down()
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    FAULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sandbox.mirror.server", str(served),
                layout.SERVICES_IP, str(layout.MIRROR_PORT),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(SOURCE_DIR.parents[1]),
            env={**os.environ, "SAILS_SANDBOX_STATE": str(layout.STATE_DIR),
                 "SAILS_SANDBOX_CACHE": str(layout.CACHE_DIR)},
        )  # fmt: skip
    PID_FILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while _health() != str(served):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the package mirror did not start; see {LOG_FILE}")
        time.sleep(0.1)


def down() -> None:
    pid = _alive()
    if pid:
        os.kill(pid, 15)
        for _ in range(50):
            if _alive() is None:
                break
            time.sleep(0.1)
    PID_FILE.unlink(missing_ok=True)


def status() -> dict[str, Any]:
    current = faults()
    return {
        "url": url(),
        "running": running(),
        "packages": len(list((repo_dir() / "pool" / COMPONENT).glob("*.deb"))),
        "faults": {k: v for k, v in current.items() if v != DEFAULT_FAULTS[k]},
    }


# -- faults -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _faults_locked() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the faults file under a lock; yields the dict to change."""
    FAULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(FAULTS_FILE.with_name(".faults.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = faults()
            yield current
            tmp = FAULTS_FILE.with_name(f".faults.{os.getpid()}")
            tmp.write_text(json.dumps(current, indent=1) + "\n")
            tmp.replace(FAULTS_FILE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def faults() -> dict[str, Any]:
    """The faults in force (defaults for whatever was never set)."""
    try:
        stored = json.loads(FAULTS_FILE.read_text())
    except (OSError, ValueError):
        stored = {}
    return {k: stored.get(k, v) for k, v in DEFAULT_FAULTS.items()}


def set_faults(
    *,
    fail_rate: float | None = None,
    fail_next: int | None = None,
    fail_status: int | None = None,
    delay: float | None = None,
    repo: str | None = None,
    clients: list[str] | None = None,
    dpkg_lock_seconds: float | None = None,
    dpkg_lock_guests: list[str] | None = None,
) -> dict[str, Any]:
    """Change the given faults (the others stay); returns all of them.

    ``fail_rate``: share of requests answered ``fail_status`` (503); ``fail_next``: that many
    next requests are; ``delay``: seconds before every answer; ``repo``: ``unsigned`` serves no
    InRelease/Release.gpg, ``tampered`` a changed index under the original signatures;
    ``clients``: only requests from these IPs meet the HTTP faults (``[]``: every client
    again); ``dpkg_lock_seconds``: guests prepared from now on hold the dpkg lock that long at
    their first boot; ``dpkg_lock_guests``: only the guests of these names (sandbox.guests
    names; ``[]``: every guest again).
    """
    if repo is not None and repo not in REPO_MODES:
        raise ValueError(f"repo must be one of {REPO_MODES}, not {repo!r}")
    if fail_rate is not None and not 0.0 <= fail_rate <= 1.0:
        raise ValueError("fail_rate is a share between 0 and 1")
    changes = {
        "fail_rate": fail_rate,
        "fail_next": fail_next,
        "fail_status": fail_status,
        "delay": delay,
        "repo": repo,
        "dpkg_lock_seconds": dpkg_lock_seconds,
    }
    with _faults_locked() as current:
        current.update({k: v for k, v in changes.items() if v is not None})
        if clients is not None:
            current["clients"] = list(clients) or None
        if dpkg_lock_guests is not None:
            current["dpkg_lock_guests"] = list(dpkg_lock_guests) or None
    return faults()


def reset_faults() -> None:
    with _faults_locked() as current:
        current.clear()
        current.update(DEFAULT_FAULTS)


@contextlib.contextmanager
def fault(**changes: Any) -> Iterator[dict[str, Any]]:
    """``set_faults(**changes)`` for the duration of a block; the faults in force before come
    back afterwards (e.g. a test's fault scoped to its guest, in a shared sandbox)."""
    saved = faults()
    try:
        yield set_faults(**changes)
    finally:
        with _faults_locked() as current:
            current.update({k: saved[k] for k in changes})


def take_failure(client: str, rand: float) -> int | None:
    """For the server: the status to answer this request with, if a fault says it fails
    (``fail_next`` is counted down here, under the lock)."""
    current = faults()
    if current["clients"] and client not in current["clients"]:
        return None
    if current["fail_next"] > 0:
        with _faults_locked() as locked:
            if locked["fail_next"] > 0:
                locked["fail_next"] -= 1
                return int(locked["fail_status"])
    if rand < current["fail_rate"]:
        return int(current["fail_status"])
    return None


# -- the guest side ---------------------------------------------------------------------------
def _mkdirs(upper: Path, rel: str) -> Path:
    """Directories of the overlay's upper layer, root-owned 0755 as in the image."""
    path = upper
    for part in Path(rel).parts:
        path = path / part
        if not path.exists():
            path.mkdir()
            os.chmod(path, 0o755)
    return path


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def lock_unit(seconds: float) -> str:
    """A unit that, at the first boot, holds /var/lib/dpkg/lock-frontend and /var/lib/dpkg/lock
    for ``seconds`` as apt, dpkg and unattended-upgrades hold them: fcntl (POSIX) write locks,
    so apt reports "Could not get lock" and ``-o DPkg::Lock::Timeout=N`` waits. It tells systemd
    it is ready once both are held, before sshd starts."""
    script = "; ".join(
        [
            "import fcntl, os, socket, sys, time",
            "os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)",
            "open(sys.argv[2], 'w').close()",
            "fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o640) for p in "
            "('/var/lib/dpkg/lock-frontend', '/var/lib/dpkg/lock')]",
            "[fcntl.lockf(fd, fcntl.LOCK_EX) for fd in fds]",
            "a = os.environ['NOTIFY_SOCKET']",
            "a = chr(0) + a[1:] if a.startswith('@') else a",
            "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', a)",
            "time.sleep(float(sys.argv[1]))",
        ]
    )
    return (
        "[Unit]\n"
        "Description=Package manager busy at first boot (sandbox fault: dpkg lock held)\n"
        f"ConditionPathExists=!{LOCK_MARKER}\n"
        "Before=ssh.service\n"
        "\n[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f'ExecStart=/usr/bin/python3 -c "{script}" {seconds:g} {LOCK_MARKER}\n'
        "TimeoutStartSec=60\n"
        "\n[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def prepare_guest(upper: Path) -> None:
    """Before a guest's first boot, in its overlay's upper layer: the mirror's deb822 source
    and its signing key; and, while the ``dpkg_lock_seconds`` fault is set, the unit that holds
    the dpkg lock at this first boot. Package lists stay empty, as on a fresh VM.

    ``upper`` is ``<guests dir>/<guest name>/upper``: the name is what ``dpkg_lock_guests``
    matches."""
    keyring = ensure_key()
    _write(_mkdirs(upper, "etc/apt/sources.list.d") / Path(GUEST_SOURCES).name, sources_text())
    _write(_mkdirs(upper, "etc/apt/keyrings") / Path(GUEST_KEYRING).name, keyring.read_bytes())
    current = faults()
    seconds = float(current["dpkg_lock_seconds"] or 0)
    only = current["dpkg_lock_guests"]
    if seconds > 0 and (not only or upper.parent.name in only):
        units = _mkdirs(upper, "etc/systemd/system")
        _write(units / LOCK_UNIT, lock_unit(seconds))
        wants = _mkdirs(upper, "etc/systemd/system/multi-user.target.wants")
        link = wants / LOCK_UNIT
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{LOCK_UNIT}")
