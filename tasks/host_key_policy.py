"""The host-key check of a connection to the VM: a key known_hosts does not list is accepted
only if the server's console printed its fingerprint (or the operator trusted it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocks.ssh import fingerprint
from core.errors import HostKeyError

if TYPE_CHECKING:
    import paramiko


def untrusted_host_key(host: str, presented: str, why: str) -> HostKeyError:
    return HostKeyError(
        f"{host} presented host key {presented}, which {why}; nothing was sent to it. If the "
        "server was rebuilt or its keys regenerated on purpose, check that fingerprint on its "
        "console (`openstack console log show`) and run `sails-bootstrap provision --config "
        f"FILE --trust-host-key {presented}`; otherwise treat it as a man-in-the-middle"
    )


def _verify_policy(expected: list[str]) -> paramiko.MissingHostKeyPolicy:
    import paramiko

    class VerifyAgainstConsole(paramiko.MissingHostKeyPolicy):
        """A key known_hosts does not list is accepted only if its fingerprint is one the
        console printed (or the operator trusted): fail closed, also when there is none."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            fp = fingerprint(f"{key.get_name()} {key.get_base64()}")
            if fp not in expected:
                raise untrusted_host_key(
                    hostname,
                    fp,
                    "is neither in the verified known_hosts nor among the console's "
                    f"fingerprints ({', '.join(expected) or 'none shown'})",
                )

    return VerifyAgainstConsole()
