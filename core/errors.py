"""Which failures are worth retrying, and the errors that name what to fix.

Transient: 5xx, 429 (keystoneauth already honours Retry-After), dropped connections, timeouts.
Permanent: other 4xx, quota, bad configuration, a server in ERROR. Retrying those only delays the
message the operator needs.
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Any


class BootstrapError(RuntimeError):
    """A failure whose message says what to fix. Never retried."""


class LockHeldOnVM(BootstrapError):
    """Another run held the VM's own lock past the wait."""


class PreflightError(BootstrapError):
    """Something is wrong before any change was made; nothing was written."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "preflight found problems; nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


class RemoteCommandError(BootstrapError):
    """A command on the VM failed."""


class HostKeyError(BootstrapError):
    """The VM presented a host key that was not verified: nothing was sent to it."""


class MissingToolError(BootstrapError):
    """The VM's image lacks a command this tool relies on."""


#: What each command the product runs on the VM comes from, for the error that names the fix.
IMAGE_PROVIDES = {
    "python3": "python3 (3.10 or later)",
    "apt-get": "apt (a Debian or Ubuntu image)",
    "dpkg-query": "dpkg (a Debian or Ubuntu image)",
    "systemctl": "systemd as init",
    "journalctl": "systemd as init",
    "sudo": "sudo, with passwordless sudo for the login user",
    "mkfs.ext4": "e2fsprogs",
    "blkid": "util-linux",
    "findmnt": "util-linux",
    "wipefs": "util-linux",
    "blockdev": "util-linux",
    "flock": "util-linux",
    "cmp": "diffutils",
    "mount": "util-linux (mount)",
    "setsid": "util-linux",
    "pgrep": "procps",
    "ssh-keygen": "openssh-client",
    "openssl": "openssl",
    "stat": "coreutils",
    "timeout": "coreutils",
}

# bash: "bash: line 1: python3: command not found"; dash: "sh: 1: python3: not found".
_NOT_FOUND = re.compile(
    r"^(?:.*?: )?(?:line )?(?:\d+: )?([A-Za-z0-9_.+-]+): (?:command )?not found\s*$", re.M
)


def missing_tool(code: int, stderr: str) -> str | None:
    """The command a shell could not find (exit 127), or None. A path that does not exist
    ("No such file or directory") is not a missing tool: the caller asked for that file."""
    if code != 127:
        return None
    match = _NOT_FOUND.search(stderr)
    return match.group(1) if match else None


def missing_tool_error(tool: str, host: str) -> MissingToolError:
    need = IMAGE_PROVIDES.get(tool, f"a `{tool}` command")
    return MissingToolError(
        f"{host} has no `{tool}` command: the VM's image must provide {need}. Use a stock "
        "Ubuntu 24.04 cloud image (server.image) or an image built from one"
    )


#: What a guest that is still booting answers on its floating IP: no route yet, nothing
#: listening yet, or no answer at all.
BOOTING_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET}
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not see."""
    if isinstance(exc, BootstrapError) or type(exc).__name__ == "TaskRunTimeoutError":
        return False  # (a step past its outer bound: another attempt would hang as long)
    try:
        from keystoneauth1 import exceptions as ks
        from openstack import exceptions as os_exc
    except ImportError:  # pragma: no cover - both ship with openstacksdk
        return False
    if isinstance(exc, os_exc.HttpException):
        code = exc.status_code or 0
        return code >= 500 or code == 429 or code == 0
    if isinstance(exc, os_exc.ResourceTimeout):
        return True
    if isinstance(exc, (ks.ConnectFailure, ks.ConnectTimeout, ks.RetriableConnectionFailure)):
        return True
    if isinstance(exc, ks.http.HttpError):
        code = getattr(exc, "http_status", 0) or 0
        return code >= 500 or code == 429
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, EOFError)):
        return True
    if isinstance(exc, OSError) and exc.errno in BOOTING_ERRNOS:
        return True
    if isinstance(exc, OSError) and str(exc) == "Socket is closed":
        return True  # paramiko, on a channel of a transport that a dropped connection ended
    try:
        import paramiko

        if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, paramiko.SSHException)):
            return not isinstance(
                exc, (paramiko.AuthenticationException, paramiko.BadHostKeyException)
            )
    except ImportError:  # pragma: no cover
        pass
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def http_detail(exc: BaseException) -> str:
    """A short description of an openstacksdk error with the cloud's own message."""
    details = getattr(exc, "details", None) or ""
    code = getattr(exc, "status_code", None)
    text = str(details or exc).strip().splitlines()[0] if str(details or exc).strip() else ""
    return f"HTTP {code}: {text}" if code else text or type(exc).__name__
