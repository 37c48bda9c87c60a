"""What the commands print besides their results: errors as an exit code, tables of records,
and Prefect's engine logs without tracebacks for errors that name their fix."""

from __future__ import annotations

import logging
from typing import Any

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _print_records(records: list[Any]) -> None:
    width = max((len(f"{r.kind} {r.name}") for r in records), default=10)
    for r in records:
        label = f"{r.kind} {r.name}"
        typer.echo(f"  {label:<{width}}  {r.action!s:<15} {r.reason}")


class _NoTracebackForNamedErrors(logging.Filter):
    """Errors that name their fix (BootstrapError) are logged by Prefect's engine with a
    traceback; on the command line the message is the whole story, so the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from core.errors import BootstrapError

        if record.exc_info and isinstance(record.exc_info[1], BootstrapError):
            record.exc_info = None
            record.exc_text = None
        return True
