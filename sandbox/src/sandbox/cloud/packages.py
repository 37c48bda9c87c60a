"""One-off installation of the sandbox cloud: Debian packages and the services venv.

The services venv (CACHE_DIR/os-venv) holds the pinned OpenStack services, uwsgi, pymysql and
the sandbox's own plugin package. It is rebuilt only when the pinned list or the plugin's
sources change (a stamp file records their hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from sandbox.cloud import common as c

PINNED = [
    "keystone==30.0.0",
    "openstack-placement==16.0.0",
    "glance==33.0.0",
    "nova==34.0.0",
    "neutron==29.0.0",
    "cinder==29.0.0",
    "uwsgi==2.0.31",
    "pymysql==1.2.4",
]
#: chromium is for the UI check (`sails-bootstrap ui`, the demo's last step and its test);
#: tcpdump for the tests that capture the sandbox's networks.
APT_PACKAGES = ["mariadb-server", "rabbitmq-server", "nftables", "conntrack", "chromium", "tcpdump"]
#: A program each Debian package brings.
APT_PROBES = {
    "mariadb-server": "/usr/sbin/mariadbd",
    "rabbitmq-server": "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "nftables": "/usr/sbin/nft",
    "conntrack": "/usr/sbin/conntrack",
    "chromium": "/usr/bin/chromium",
    "tcpdump": "/usr/bin/tcpdump",
}
STAMP = c.VENV / ".sails-stamp"
PTH_NAME = "sails_sandbox_repo.pth"


def _log(msg: str) -> None:
    print(f"[sandbox.cloud] {msg}", flush=True)


def apt_install(packages: list[str], probes: dict[str, str]) -> None:
    missing = [p for p in packages if not Path(probes.get(p, "/nonexistent")).exists()]
    if not missing:
        return
    _log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )


def plugin_hash() -> str:
    h = hashlib.sha256("\n".join(PINNED).encode())
    for path in sorted(c.PLUGIN_SRC.rglob("*")):
        parts = path.relative_to(c.PLUGIN_SRC).parts
        built = parts[0] == "build" or any(
            p.endswith(".egg-info") or p == "__pycache__" for p in parts
        )
        if path.is_file() and not built and path.suffix in {".py", ".toml"}:
            h.update(str(path.relative_to(c.PLUGIN_SRC)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def venv_current() -> bool:
    return STAMP.exists() and STAMP.read_text().strip() == plugin_hash()


def write_pth() -> None:
    """Make this checkout's ``sandbox`` package importable inside the services venv."""
    (c.SITE / PTH_NAME).write_text(str(c.REPO_ROOT) + "\n")


def install_venv() -> None:
    want = plugin_hash()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        write_pth()
        return
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is needed on PATH to build the sandbox's services venv")
    python = c.VENV_BIN / "python"
    if not python.exists():
        _log(f"creating {c.VENV}")
        c.VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([uv, "venv", "--python", "3.11", str(c.VENV)], check=True)
    _log("installing the OpenStack services into the services venv")
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--python",
            str(python),
            "--reinstall-package",
            "sails-cloud-plugins",
            *PINNED,
            str(c.PLUGIN_SRC),
        ],
        check=True,
    )
    write_pth()
    STAMP.write_text(want + "\n")


def install() -> None:
    """Install everything the sandbox cloud needs. Idempotent; fast when nothing changed."""
    apt_install(APT_PACKAGES, APT_PROBES)
    install_venv()
