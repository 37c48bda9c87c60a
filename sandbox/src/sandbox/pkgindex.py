"""A package index for the guests, which have no internet: PEP 503 "simple" pages over wheels.

The wheels are downloaded once on the host (same Python minor version and platform as the
guests' Debian python3) and kept in the cache, keyed by the requirement list. The index is served
on the tenant gateway, where every guest reaches it; the product is simply configured with its
URL (``prefect.package_index``), as an air-gapped cloud's mirror would be.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sandbox import layout, net, pidfile

REQUIREMENTS = [
    "prefect==3.9.1",
    "canfar==1.5.2",
    "openstacksdk==4.22.0",
    "fabric==3.2.3",
    "pyyaml",
    "typer",
    # The guests' Debian python is 3.11.2: markers like python_full_version < "3.11.3" pull
    # these in there, and a host with a newer 3.11 would not download them.
    "async-timeout>=4.0.3",
    "pip",
    "setuptools",
    "wheel",
]
#: Sets downloaded apart (they conflict with REQUIREMENTS): the Prefect the operators ran
#: before this package's pin, which an upgrade starts from, with the FastAPI and Starlette of
#: its time (3.6.29 fails on today's: its router lacks what FastAPI 0.137 reads).
OLDER = [
    [
        "prefect==3.6.29",
        "canfar==1.5.2",
        "fastapi<0.137",
        "starlette<1",
        "async-timeout>=4.0.3",
    ]
]
#: What the guests run: Debian 12's CPython 3.11 on x86_64, glibc 2.36. pip (23.x) does not
#: widen a manylinux_2_N tag to older ones by itself, so every accepted tag is listed.
TARGET = [
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
    *[a for v in range(36, 16, -1) for a in ("--platform", f"manylinux_2_{v}_x86_64")],
    *[a for t in ("2014", "2010", "1") for a in ("--platform", f"manylinux{t}_x86_64")],
]
PID_FILE = layout.STATE_DIR / "run" / "pkgindex.pid"
LOG_FILE = layout.STATE_DIR / "logs" / "pkgindex.log"


def url() -> str:
    return f"http://{layout.SERVICES_IP}:{layout.INDEX_PORT}/simple"


def _key() -> str:
    text = "\n".join([*TARGET, *REQUIREMENTS, *(r for older in OLDER for r in older)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def root() -> Path:
    return layout.CACHE_DIR / "pkgindex" / _key()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project(filename: str) -> str:
    if filename.endswith(".whl"):
        return _normalise(filename.split("-")[0])
    stem = re.sub(r"\.(tar\.gz|zip|tar\.bz2)$", "", filename)
    return _normalise(stem.rsplit("-", 1)[0])


def _pip_python() -> str:
    """A Python with pip (the project's venv has none): the base interpreter, or python3."""
    for candidate in (getattr(sys, "_base_executable", ""), shutil.which("python3") or ""):
        if (
            candidate
            and subprocess.run(
                [candidate, "-m", "pip", "--version"], capture_output=True
            ).returncode
            == 0
        ):
            return candidate
    raise RuntimeError("no python3 with pip on this machine to download the guests' wheels")


def build(log=print) -> Path:  # type: ignore[no-untyped-def]
    """Download the wheels (once per requirement list) and write the simple pages."""
    target = root()
    if (target / ".complete").exists():
        return target
    files = target / "files"
    files.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"downloading wheels for the guests' package index ({len(REQUIREMENTS)} requirements)")
    pip = [_pip_python(), "-m", "pip", "download", "--quiet", "--dest", str(files)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wheels = subprocess.run(
        [*pip, "--only-binary=:all:", *TARGET, *REQUIREMENTS], env=env, capture_output=True
    )
    if wheels.returncode:  # some project has no wheel: this host's own tags, sdists allowed
        log(f"wheels only failed ({wheels.stderr.decode()[-300:].strip()}); allowing sdists")
        subprocess.run([*pip, "--prefer-binary", *REQUIREMENTS], env=env, check=True)
    for older in OLDER:
        subprocess.run([*pip, "--only-binary=:all:", *TARGET, *older], env=env, check=True)
    simple = target / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    projects: dict[str, list[str]] = {}
    for f in sorted(files.iterdir()):
        projects.setdefault(_project(f.name), []).append(f.name)
    simple.mkdir()
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(projects))
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    for project, names in projects.items():
        (simple / project).mkdir()
        body = "".join(
            f'<a href="../../files/{html.escape(n)}#sha256='
            f'{hashlib.sha256((files / n).read_bytes()).hexdigest()}">{html.escape(n)}</a>\n'
            for n in names
        )
        (simple / project / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{body}</body></html>\n"
        )
    (target / ".complete").write_text("ok\n")
    log(f"package index: {len(projects)} projects in {time.monotonic() - t0:.0f} s")
    return target


def _marks() -> tuple[bytes, bytes]:
    """What the index server's command line carries: Python's http.server on the index port."""
    return b"http.server", str(layout.INDEX_PORT).encode()


def _alive() -> int | None:
    """The index's server process (checked by its command line, not just the pid)."""
    return pidfile.alive(PID_FILE, *_marks())


def running() -> bool:
    try:
        with urllib.request.urlopen(url() + "/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def up() -> str:
    """Serve the index on the tenant gateway (idempotent); returns its URL."""
    net.ensure_network()
    served = build()
    pid = _alive()
    if pid and str(served).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and running():
        return url()  # already serving this requirement list
    down()
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                layout.SERVICES_IP,
                "--directory",
                str(served),
                str(layout.INDEX_PORT),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    PID_FILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while not running():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the package index did not start; see {LOG_FILE}")
        time.sleep(0.1)
    return url()


def down() -> None:
    pidfile.stop(PID_FILE, *_marks())
