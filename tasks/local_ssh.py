"""The operator's own ssh set-up: a managed host alias, the key file, and verified host keys.

The alias lives in its own file, included from ~/.ssh/config (the user's file gets one Include
line, nothing else). known_hosts entries for the floating IP are replaced only by host keys
that match the fingerprints the server printed on its console (or that the operator trusted
with --trust-host-key); where neither vouches for a key, nothing is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from blocks.ssh import fingerprint, write_private
from core.config import BootstrapConfig
from core.errors import BootstrapError, HostKeyError
from core.log import logger
from core.poll import poll
from core.records import Action, LocalSSHRecord
from tasks.first_boot import wait_for_port

if TYPE_CHECKING:
    from blocks.ssh import SSHKeyPair

MANAGED_FILE = "sails-bootstrap.conf"
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512")


def ssh_dir(config: BootstrapConfig) -> Path:
    return Path(config.ssh.config_dir).expanduser()


def key_file(config: BootstrapConfig) -> Path:
    """Where the VM's private key is written for ssh (0600), named after the keypair."""
    return ssh_dir(config) / f"{config.keypair_name}.pem"


def known_hosts_file(config: BootstrapConfig) -> Path:
    return ssh_dir(config) / "known_hosts"


def _alias_block(config: BootstrapConfig, address: str) -> str:
    return (
        f"# BEGIN {config.environment} (managed by sails-bootstrap)\n"
        f"Host {config.ssh.alias}\n"
        f"    HostName {address}\n"
        f"    User {config.server.user}\n"
        f"    IdentityFile {key_file(config)}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts_file(config)}\n"
        # the Prefect API and UI listen on the VM's loopback only: `ssh -N ALIAS` brings them
        # here (a second session with the port taken warns and runs on)
        f"    LocalForward 127.0.0.1:{config.prefect.local_port} "
        f"127.0.0.1:{config.prefect.port}\n"
        f"# END {config.environment}\n"
    )


def _replace_block(text: str, env: str, block: str | None) -> str:
    pattern = re.compile(
        rf"# BEGIN {re.escape(env)} \(managed by sails-bootstrap\)\n.*?# END {re.escape(env)}\n",
        re.S,
    )
    text = pattern.sub("", text)
    return text + (block or "")


def host_matches(entry_hosts: str, address: str) -> bool:
    """Does a known_hosts host field (plain list or |1|salt|hash) name this address?"""
    if entry_hosts.startswith("|1|"):
        _, _, salt, digest = entry_hosts.split("|", 3)
        mac = hmac.new(base64.b64decode(salt), address.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
    return address in entry_hosts.split(",")


def scan_host_keys(address: str, port: int = 22, timeout: float = 10) -> list[str]:
    """The server's host keys as 'type base64' strings, one handshake per key type.

    A type the server has no key of is skipped; a handshake that fails otherwise (sshd still
    starting, the connection dropped) raises, so the caller waits and asks again."""
    import socket

    import paramiko
    from paramiko.ssh_exception import IncompatiblePeer

    keys = []
    for key_type in HOST_KEY_TYPES:
        sock = socket.create_connection((address, port), timeout=timeout)
        transport = paramiko.Transport(sock)
        try:
            transport.get_security_options().key_types = [key_type]
            transport.start_client(timeout=timeout)
            key = transport.get_remote_server_key()
            keys.append(f"{key.get_name()} {key.get_base64()}")
        except IncompatiblePeer:
            continue  # the server has no key of this type
        finally:
            transport.close()
    return keys


def wait_for_host_keys(address: str, timeout: float, port: int = 22) -> list[str]:
    """Port 22 accepting connections, then the host keys. A guest that is still booting (no
    route, refused, sshd not answering its banner yet) is waited for within ``timeout``."""
    import paramiko

    waited = wait_for_port(address, port, timeout)
    if waited > 5:
        logger().info("%s:%d accepts connections after %.0f s", address, port, waited)

    def scan() -> list[str] | str:
        """The host keys, or why there are none yet."""
        try:
            return scan_host_keys(address, port) or "no host key offered"
        except (OSError, EOFError, paramiko.SSHException) as exc:
            return str(exc) or type(exc).__name__

    keys = poll(
        scan,
        lambda found: isinstance(found, list),
        f"sshd on {address} to present its host keys",
        max(0.0, timeout - waited),
        state=str,
        timed_out=lambda problem: BootstrapError(
            f"{address}:{port} accepts connections but no SSH handshake succeeded within "
            f"{timeout:.0f} s (server.boot_timeout): {problem}. Check the server's console "
            "log for sshd"
        ),
    )
    assert isinstance(keys, list)
    return keys


def ensure_local_ssh(
    config: BootstrapConfig,
    key: SSHKeyPair,
    address: str,
    console_fingerprints: list[str] | Callable[[], list[str]],
    apply: bool = True,
) -> LocalSSHRecord:
    """Key file, alias and verified known_hosts entries so that ``ssh ALIAS`` just works."""
    log = logger()
    directory = ssh_dir(config)
    record = LocalSSHRecord(
        name=config.ssh.alias, alias=config.ssh.alias, key_file=str(key_file(config)), applied=apply
    )
    changes: list[str] = []

    kf = key_file(config)
    if not kf.exists() or kf.read_text() != key.private_key.get_secret_value():
        changes.append("key file")
    elif kf.stat().st_mode & 0o077:
        changes.append("key file mode")

    user_config = directory / "config"
    managed = directory / MANAGED_FILE
    include = f"Include {managed}\n"
    user_text = user_config.read_text() if user_config.exists() else ""
    if include not in user_text:
        changes.append("Include line in ssh config")
    managed_text = managed.read_text() if managed.exists() else ""
    new_managed = _replace_block(managed_text, config.environment, _alias_block(config, address))
    if new_managed != managed_text:
        changes.append(f"alias {config.ssh.alias} -> {address}")

    # Host keys: the ones on the console are the truth; anything else for this address is stale.
    kh = known_hosts_file(config)
    kh_lines = kh.read_text().splitlines() if kh.exists() else []
    scanned = wait_for_host_keys(address, config.server.boot_timeout)
    known = {
        (f[1], f[2])
        for f in (line.split() for line in kh_lines)
        if len(f) >= 3 and not f[0].startswith("#") and host_matches(f[0], address)
    }
    if scanned and all(tuple(k.split()[:2]) in known for k in scanned):
        # Verified on an earlier run and unchanged since: no need to read the console again.
        console_fingerprints = [fingerprint(k) for k in scanned]
        record.host_key_check = "known_hosts"
    elif callable(console_fingerprints):
        console_fingerprints = console_fingerprints()
    trusted = [*console_fingerprints, *config.ssh.trusted_host_keys]
    if record.host_key_check == "known_hosts":
        verified = scanned
    else:
        # Fail closed: a key is verified by the console (or the operator's --trust-host-key),
        # never taken on first sight.
        verified = [k for k in scanned if fingerprint(k) in trusted]
        if not verified:
            presented = ", ".join(fingerprint(k) for k in scanned) or "none"
            raise HostKeyError(
                f"none of the host keys {address} presents ({presented}) is verified: "
                + (
                    f"the server's console shows {', '.join(console_fingerprints)}. Possible "
                    "man-in-the-middle or a reused address; check the console log"
                    if console_fingerprints
                    else "the server's console shows no fingerprints (scrolled off, or the "
                    "image prints none)"
                )
                + ". If the keys were regenerated on purpose, check the fingerprint on the VM "
                "itself and run again with --trust-host-key SHA256:…; nothing was sent to it"
            )
        record.host_key_check = "console" if console_fingerprints else "trusted"
    wanted = [f"{address} {k}" for k in verified]
    kept: list[str] = []
    stale: list[str] = []
    for line in kh_lines:
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#") and host_matches(fields[0], address):
            (kept if f"{address} {fields[1]} {fields[2]}" in wanted else stale).append(line)
        else:
            kept.append(line)
    missing = [w for w in wanted if w not in kept]
    if stale:
        changes.append(
            f"removed {len(stale)} stale known_hosts entr{'y' if len(stale) == 1 else 'ies'}"
        )
    if missing:
        changes.append(f"added {len(missing)} verified host key(s)")

    record.changes = changes
    record.host_keys = [fingerprint(k) for k in verified]
    if changes:
        record.action = Action.CHANGE if kf.exists() else Action.CREATE
        record.reason = "; ".join(changes)
    else:
        record.reason = f"ssh {config.ssh.alias} ready"
    if not apply or not changes:
        return record

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key.write_private_key(kf)
    if include not in user_text:
        write_private(user_config, include + user_text)
    if new_managed != managed_text:
        write_private(managed, new_managed)
    if stale or missing:
        write_private(kh, "\n".join(kept + missing) + "\n")
    log.info("local ssh: %s", record.reason)
    return record


def remove_local_ssh(config: BootstrapConfig) -> None:
    """Drop this environment's alias (teardown keeps the key file and known_hosts)."""
    managed = ssh_dir(config) / MANAGED_FILE
    if managed.exists():
        write_private(managed, _replace_block(managed.read_text(), config.environment, None))
