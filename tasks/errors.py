"""Which failures are worth retrying, and the errors that name what to fix.

Transient: 5xx, 429 (keystoneauth already honours Retry-After), dropped connections, timeouts.
Permanent: other 4xx, quota, bad configuration, a server in ERROR. Retrying those only delays the
message the operator needs.
"""

from __future__ import annotations

import socket
from typing import Any


class BootstrapError(RuntimeError):
    """A failure whose message says what to fix. Never retried."""


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


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not see."""
    if isinstance(exc, BootstrapError):
        return False
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
    try:
        import paramiko

        if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, paramiko.SSHException)):
            return not isinstance(exc, paramiko.AuthenticationException)
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
