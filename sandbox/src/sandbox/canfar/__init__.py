"""Stand-ins for the CANFAR services the bootstrap touches, on the tenant gateway address.

- the /arc host (OpenSSH, SFTP only) on ``SERVICES_IP:64022``, as ws-uv.canfar.net;
- the Skaha session API on ``https://SERVICES_IP:8443/skaha/v1`` (X.509 client certificates
  or bearer tokens);
- the IVOA registry and CADC credential service on ``https://SERVICES_IP:8444`` (basic auth →
  proxy certificate);
- the guests' package index (``sandbox.pkgindex``) on ``http://SERVICES_IP:8480/simple``.

A sandbox CA signs the services' TLS certificates and the users' proxy certificates. Both the
host and the sandbox's guests reach everything here. The stand-ins know nothing of the product.

    from sandbox import canfar
    canfar.up()                       # idempotent
    os.environ.update(canfar.env())   # CANFAR_URL, CANFAR_CERTIFICATE, SSL_CERT_FILE
    canfar.info()                     # what goes into CanfarCredentials and the /arc config
    canfar.down()                     # the CA, users, keys and session records stay
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sandbox import ca, layout, net, pkgindex
from sandbox.canfar import arc, services

USER = "sailsuser"
PROJECT = arc.PROJECT
DATA = layout.STATE_DIR / "canfar"
RUN = layout.STATE_DIR / "run"
LOGS = layout.STATE_DIR / "logs"
CERT = DATA / "cadcproxy.pem"
PASSWORD_FILE = DATA / "password"
TOKEN_FILE = DATA / "token"
APT_PACKAGES = {"openssh-server": "/usr/sbin/sshd", "sshfs": "sshfs", "fuse3": "fusermount3"}
SERVICES = ("skaha", "cred")


# -- addresses -------------------------------------------------------------------------------
def skaha_url() -> str:
    """The full session-API base the canfar client takes as ``CANFAR_URL``."""
    return services.skaha_origin() + services.SKAHA_BASE


def registry_url() -> str:
    return services.cred_origin() + "/reg/resource-caps"


def cred_url() -> str:
    """The credential service's CDP endpoint for username + password (BasicAA)."""
    return services.cred_origin() + services.CDP_PATH


def ca_bundle() -> Path:
    """System CAs + the sandbox CA (for ``SSL_CERT_FILE``)."""
    ca.ensure_ca()
    return ca.bundle_path()


def ca_pem() -> str:
    """The sandbox CA certificate as PEM, to install in a guest's trust store."""
    return ca.ca_pem()


# -- secrets ---------------------------------------------------------------------------------
def _secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def password() -> str:
    """The default user's password at the credential service (generated once, 0600)."""
    return _secret(PASSWORD_FILE)


def token() -> str:
    """A bearer token the session API accepts for the default user."""
    return _secret(TOKEN_FILE)


def add_user(name: str, user_password: str) -> None:
    """Another account at the credential service (and /arc, once ``up()`` prepares it)."""
    users = dict(services.settings()["users"])
    users[name] = user_password
    services.update_settings(users=users)


# -- life cycle ------------------------------------------------------------------------------
def install() -> None:
    """Debian packages (openssh-server, sshfs, fuse3), the CA and the guests' wheels."""
    missing = [
        pkg for pkg, cmd in APT_PACKAGES.items() if not (Path(cmd).exists() or shutil.which(cmd))
    ]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        policy = Path("/usr/sbin/policy-rc.d")  # no service starts during the install
        created = not policy.exists()
        if created:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
            if subprocess.run(cmd, env=env, capture_output=True).returncode:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                subprocess.run(cmd, env=env, check=True, capture_output=True)
        finally:
            if created:
                policy.unlink(missing_ok=True)
    ca.ensure_ca()
    pkgindex.build()


def _pid(name: str) -> int | None:
    """The pid of our service process, checked against its command line (no stale pids)."""
    try:
        pid = int((RUN / f"canfar-{name}.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if _command(name).encode() in cmdline else None


def _command(name: str) -> str:
    return f"from sandbox.canfar.services import serve; serve({name!r})"


def _answers(url: str) -> bool:
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
            [sys.executable, "-c", _command(name)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
    (RUN / f"canfar-{name}.pid").write_text(f"{proc.pid}\n")


def _stop(name: str) -> None:
    pid = _pid(name)
    if pid:
        os.kill(pid, signal.SIGTERM)  # the session service kills its sessions first
        deadline = time.monotonic() + 5
        while _pid(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid(name):
            os.kill(pid, signal.SIGKILL)
    (RUN / f"canfar-{name}.pid").unlink(missing_ok=True)


def up() -> dict[str, Any]:
    """Start the /arc host, both HTTPS services and the package index (idempotent)."""
    install()
    net.ensure_network()
    users = dict(services.settings()["users"])
    users[USER] = password()
    services.update_settings(users=users, tokens={token(): USER})
    ca.server_certificate(layout.SERVICES_IP)
    for user in users:
        arc.prepare_user(user)
    arc.prepare()
    arc.start()
    for name in SERVICES:
        _start(name)
    origin = services.skaha_origin()
    deadline = time.monotonic() + 20
    while not (
        _answers(origin + "/skaha/availability")
        and _answers(services.cred_origin() + "/cred/availability")
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the CANFAR stand-ins did not answer; see {LOGS}/canfar-*.log")
        time.sleep(0.1)
    pkgindex.up()
    if not _certificate_usable(CERT):
        mint_certificate(path=CERT)
    return info()


def _certificate_usable(path: Path, margin: float = 86400) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc.timestamp() - time.time() > margin


def down() -> None:
    """Stop everything; the CA, users, keys, /arc data and session records stay."""
    for name in SERVICES:
        _stop(name)
    arc.stop()
    pkgindex.down()


def status() -> dict[str, Any]:
    return {
        "arc": arc.running(),
        "skaha": _pid("skaha") is not None,
        "cred": _pid("cred") is not None,
        "package_index": pkgindex.running(),
    }


def env() -> dict[str, str]:
    """What the canfar client needs, and nothing else (certificate auth)."""
    if not _certificate_usable(CERT):
        mint_certificate(path=CERT)
    return {
        "CANFAR_URL": skaha_url(),
        "CANFAR_CERTIFICATE": str(CERT),
        "SSL_CERT_FILE": str(ca_bundle()),
    }


def info() -> dict[str, Any]:
    """What a user puts in the CanfarCredentials block and the config's /arc section."""
    return {
        "canfar_url": skaha_url(),
        "registry_url": registry_url(),
        "cred_url": cred_url(),
        "username": USER,
        "password_file": str(PASSWORD_FILE),
        "token_file": str(TOKEN_FILE),
        "ca_bundle": str(ca.ca_cert_path()),
        "ca_bundle_with_system": str(ca.bundle_path()),
        "arc_host": layout.SERVICES_IP,
        "arc_port": layout.ARC_PORT,
        "arc_user": USER,
        "arc_project": PROJECT,
        "arc_host_keys": arc.host_key_lines(),
        "package_index": pkgindex.url(),
    }


# -- handles for tests and demos -------------------------------------------------------------
def mint_certificate(
    *, days: float = 30, seconds: float | None = None, path: Path | None = None, user: str = USER
) -> str:
    """A proxy certificate (PEM: certificate + key) signed by the sandbox CA, as the credential
    service issues them; ``seconds`` overrides ``days`` (e.g. one that expires in a minute).
    With ``path`` it is also written there (0600)."""
    pem = ca.proxy_certificate(user, seconds=seconds if seconds is not None else days * 86400)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
        os.chmod(path, 0o600)
    return pem


def set_certificate_validity(seconds: float | None) -> None:
    """Certificates the credential service issues from now on last ``seconds`` (None: the
    requested daysValid, capped at ``max_days_valid``)."""
    services.update_settings(validity_seconds=seconds)


def set_images(images: list[str | dict[str, Any]]) -> None:
    """The image list of the session API (references like
    ``images.canfar.net/skaha/astroml:latest``, or {"id", "types"})."""
    services.update_settings(images=images)


def set_failure(
    *,
    fail_next_creates: int = 0,
    status: int = 503,
    start_delay: float | None = None,
    time_limit: float | None = None,
    validity_seconds: float | None = None,
) -> None:
    """Fault injection. Called with no arguments it resets to the defaults."""
    changes: dict[str, Any] = {
        "fail_next_creates": fail_next_creates,
        "fail_status": status,
        "validity_seconds": validity_seconds,
        "start_delay": services.DEFAULT_SETTINGS["start_delay"]
        if start_delay is None
        else start_delay,
        "time_limit": services.DEFAULT_SETTINGS["time_limit"] if time_limit is None else time_limit,
    }
    services.update_settings(**changes)


def add_arc_key(public_key: str, user: str = USER) -> None:
    """Authorise an SSH public key for ``user`` at the /arc host (what the operator does on
    CANFAR with the VM's ~/.ssh/canfar_key.pub)."""
    arc.add_key(user, public_key)


def sessions(user: str = USER) -> list[dict[str, Any]]:
    """The user's sessions that have not been deleted, as the session API lists them."""
    return services.live_sessions(user)


def arc_write(path: str, text: str, user: str = USER) -> Path:
    """Put a file on /arc as ``user`` would (``path`` relative to the /arc root, e.g.
    ``projects/ALMA-SAILS/code/x.py``); parent folders are made and owned by the user."""
    return arc.write_file(user, path, text)


def arc_stop() -> None:
    arc.stop()


def arc_start() -> None:
    arc.start()


def arc_restart() -> None:
    arc.restart()


def arc_freeze() -> None:
    """SIGSTOP the /arc sshd and all its session processes: connections stay up, nothing
    answers (a hung server)."""
    arc.freeze()


def arc_thaw() -> None:
    arc.thaw()
