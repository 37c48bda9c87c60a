"""Stand-ins for the CANFAR services the bootstrap touches, on the tenant gateway address.

- the /arc host (OpenSSH, SFTP only) on port 64022, as ws-uv.canfar.net;
- the Skaha session API (HTTPS; X.509 client certificates or bearer tokens);
- the IVOA registry and CADC credential service (HTTPS; basic auth → proxy certificate);
- the guests' package index (``sandbox.pkgindex``).

Both the host and the sandbox's guests reach them. They know nothing of the product.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from sandbox import layout, net, pkgindex
from sandbox.canfar import arc, ca, services

USER = "sailsuser"
RUN = layout.STATE_DIR / "run"
LOGS = layout.STATE_DIR / "logs"
CERT = layout.STATE_DIR / "canfar" / "cadcproxy.pem"
PASSWORD_FILE = layout.STATE_DIR / "canfar" / "password"
TOKEN_FILE = layout.STATE_DIR / "canfar" / "token"


def skaha_url() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.SKAHA_PORT}{services.SKAHA_BASE}"


def registry_url() -> str:
    return f"https://{layout.SERVICES_IP}:{layout.CRED_PORT}/reg/resource-caps"


def _secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def password() -> str:
    return _secret(PASSWORD_FILE)


def token() -> str:
    return _secret(TOKEN_FILE)


def install() -> None:
    missing = [
        p
        for p, cmd in (
            ("openssh-server", "/usr/sbin/sshd"),
            ("sshfs", "sshfs"),
            ("fuse3", "fusermount3"),
        )
        if not (Path(cmd).exists() or shutil.which(cmd))
    ]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(
            ["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True
        ).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(
                ["apt-get", "install", "-y", "-q", *missing],
                env=env,
                check=True,
                capture_output=True,
            )
    ca.ensure_ca()
    pkgindex.build()


def _pid(name: str) -> int | None:
    try:
        pid = int((RUN / f"canfar-{name}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _answers(url: str) -> bool:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca.ca_cert_path()))
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _start(name: str) -> None:
    if _pid(name):
        return
    RUN.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"canfar-{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.canfar.services", name],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
    (RUN / f"canfar-{name}.pid").write_text(f"{proc.pid}\n")


def up() -> dict[str, Any]:
    """Start the /arc host, both HTTPS services and the package index (idempotent)."""
    install()
    net.ensure_network()
    services.update_settings(users={USER: password()}, tokens={token(): USER})
    arc.prepare(USER)
    arc.start()
    _start("skaha")
    _start("cred")
    deadline = time.monotonic() + 20
    while not (_answers(skaha_url() + "/image") and _answers(registry_url())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the CANFAR stand-ins did not answer; see {LOGS}/canfar-*.log")
        time.sleep(0.1)
    pkgindex.up()
    mint_certificate(path=CERT)
    return info()


def down() -> None:
    for name in ("skaha", "cred"):
        pid = _pid(name)
        if pid:
            os.kill(pid, 15)
        (RUN / f"canfar-{name}.pid").unlink(missing_ok=True)
    arc.stop()
    pkgindex.down()


def status() -> dict[str, Any]:
    return {
        "arc": arc.running(),
        "skaha": _pid("skaha") is not None,
        "cred": _pid("cred") is not None,
        "package_index": pkgindex.running(),
    }


def mint_certificate(
    *, days: float = 30, seconds: float | None = None, path: Path | None = None, user: str = USER
) -> str:
    """A proxy certificate signed by the sandbox CA (tests: one that expires in seconds)."""
    pem = ca.proxy_certificate(user, seconds=seconds if seconds is not None else days * 86400)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
    return pem


def env() -> dict[str, str]:
    return {
        "CANFAR_URL": skaha_url(),
        "CANFAR_CERTIFICATE": str(CERT),
        "SSL_CERT_FILE": str(ca.bundle_path()),
    }


def info() -> dict[str, Any]:
    """What a user puts in the CanfarCredentials block and the config's /arc section."""
    return {
        "canfar_url": skaha_url(),
        "registry_url": registry_url(),
        "username": USER,
        "password_file": str(PASSWORD_FILE),
        "ca_bundle": str(ca.ca_cert_path()),
        "arc_host": layout.SERVICES_IP,
        "arc_port": layout.ARC_PORT,
        "arc_user": USER,
        "package_index": pkgindex.url(),
    }


# -- handles for tests ---------------------------------------------------------------------------
def add_arc_key(public_key: str) -> None:
    arc.add_key(USER, public_key)


def arc_stop() -> None:
    arc.stop()


def arc_start() -> None:
    arc.start()


def arc_restart() -> None:
    arc.restart()


def arc_freeze() -> None:
    arc.freeze()


def arc_thaw() -> None:
    arc.thaw()


def set_failure(
    *,
    fail_next_creates: int = 0,
    start_delay: float | None = None,
    validity_seconds: float | None = None,
) -> None:
    changes: dict[str, Any] = {
        "fail_next_creates": fail_next_creates,
        "validity_seconds": validity_seconds,
    }
    if start_delay is not None:
        changes["start_delay"] = start_delay
    services.update_settings(**changes)
