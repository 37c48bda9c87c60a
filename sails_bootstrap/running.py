"""Running a flow from the command line: the local API, the environment's lock, and errors
that name their fix printed without a traceback."""

from __future__ import annotations

import contextlib
from typing import Any

import typer

from core.config import BootstrapConfig, ConfigError
from sails_bootstrap.local_api import ensure_api
from sails_bootstrap.output import _print_records, fail


def run_flow(fn: Any, lock: BootstrapConfig | None = None, command: str = "") -> Any:
    """Run a flow function; errors that name a fix are printed without a traceback. With
    ``lock`` (a command that changes the environment), one run of it at a time."""
    from core.errors import BootstrapError, http_detail, is_transient
    from sails_bootstrap.lock import LockHeld, environment_lock

    ensure_api()
    try:
        with (
            environment_lock(lock.environment, command, say=lambda m: typer.echo(m, err=True))
            if lock is not None
            else contextlib.nullcontext()
        ):
            return fn()
    except (BootstrapError, ConfigError, LockHeld) as exc:
        raise fail(f"error: {exc}", code=1) from None
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise fail(
            f"error: still failing after retries: {http_detail(exc)}. Check that the cloud "
            "(the auth URL of your clouds.yaml entry or credentials block) and the VM are "
            "reachable from this machine, then run the command again: it picks up where it "
            "stopped.",
            code=1,
        ) from None


def apply_flow(cfg: BootstrapConfig, command: str, flow: Any) -> Any:
    """Run a flow that changes the environment (one at a time) and print its records."""
    result = run_flow(lambda: flow(cfg), cfg, command)
    _print_records(result.records)
    return result
