"""The host keys a server prints on its console at first boot (cloud-init), read before the
first SSH connection so that connection can be verified."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from core.poll import poll

if TYPE_CHECKING:
    from openstack.connection import Connection


def console_fingerprints(conn: Connection, server_id: str, wait: float = 60) -> list[str]:
    """SSH host key fingerprints the server printed on its console (cloud-init's block).

    cloud-init prints them in its final stage, a minute or more after Nova says ACTIVE on a real
    cloud: the console is read again until they appear, up to ``wait`` seconds after the server
    was launched (one read for a server launched longer ago, or with ``wait=0``). The wait ends
    early once cloud-init says it finished without printing them (an image configured not to)."""
    since = _seconds_since_launch(conn, server_id) if wait > 0 else 0.0
    deadline = time.monotonic() + max(0.0, wait - since)

    def read() -> str:
        return conn.compute.get_server_console_output(server_id).get("output") or ""

    def settled(output: str) -> bool:
        """Printed, or cloud-init finished without printing them, or the wait is over."""
        return (
            bool(parse_fingerprints(output))
            or bool(CLOUD_INIT_FINISHED.search(output))
            or time.monotonic() > deadline
        )

    output = poll(
        read,
        settled,
        f"the host key fingerprints on server {server_id[:8]}'s console",
        max(0.0, wait - since) + 60,  # the deadline above ends it; this bound is never met
        interval=3,
        state=lambda _: "not printed yet (cloud-init's final stage prints them)",
    )
    return parse_fingerprints(output)


def _seconds_since_launch(conn: Connection, server_id: str) -> float:
    """Seconds since Nova launched the server (0 when it does not say)."""
    from datetime import UTC, datetime

    launched = getattr(conn.compute.get_server(server_id), "launched_at", None)
    if not launched:
        return 0.0
    try:
        when = datetime.fromisoformat(str(launched).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # Nova's launched_at is UTC without an offset
    return max(0.0, (datetime.now(UTC) - when).total_seconds())


#: cloud-init's last line on the console ("Cloud-init v. 24.1 finished at ...").
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at")


_HOST_KEY_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY (FINGERPRINTS|KEYS)-----(.*?)-----END SSH HOST KEY \1-----", re.S
)


# ssh-keygen -l: "256 SHA256:<43 base64 characters> root@host (ED25519)".
_SHA256 = re.compile(r"\bSHA256:([A-Za-z0-9+/]{43})(?![A-Za-z0-9+/])")


_PUBLIC_KEY = re.compile(
    r"\b((?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)) AAAA[A-Za-z0-9+/]+={0,2})"
)


def parse_fingerprints(console: str) -> list[str]:
    """The host key fingerprints in a console log, from the last complete block cloud-init
    printed (``-----BEGIN SSH HOST KEY FINGERPRINTS-----``; its lines may carry a syslog
    prefix such as ``<14>Dec  2 15:00:00 ec2:`` and other output may be interleaved). Without
    one, they are computed from the ``-----BEGIN SSH HOST KEY KEYS-----`` block. Everything
    else (the ``ci-info`` tables of the user's authorized keys, a block cut off by the
    console's size limit) is ignored."""
    from blocks.ssh import fingerprint

    text = console.replace("\r", "")
    last: dict[str, str] = {}
    for match in _HOST_KEY_BLOCK.finditer(text):
        last[match.group(1)] = match.group(2)
    found = [f"SHA256:{m}" for m in _SHA256.findall(last.get("FINGERPRINTS", ""))]
    if not found:
        found = []
        for key in _PUBLIC_KEY.findall(last.get("KEYS", "")):
            try:
                found.append(fingerprint(key))
            except ValueError:
                continue
    return list(dict.fromkeys(found))
