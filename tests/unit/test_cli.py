from __future__ import annotations

import pytest

COMMANDS = [
    [],
    ["config"],
    ["config", "validate"],
    ["config", "show"],
    ["blocks"],
    ["blocks", "register"],
    *[[c] for c in ("plan", "provision", "configure", "register", "up", "down", "health")],
    ["remount"],
    ["reauth"],
    ["backup"],
    ["restore"],
    ["ui"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str]) -> None:
    from typer.testing import CliRunner

    from sails_bootstrap.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
