from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [
    [],
    ["config"],
    ["config", "validate"],
    ["config", "show"],
    ["blocks"],
    ["blocks", "register"],
    ["sandbox"],
    ["sandbox", "install"],
    ["sandbox", "up"],
    ["sandbox", "down"],
    ["sandbox", "status"],
    ["sandbox", "env"],
    ["sandbox", "blocks"],
    *[[c] for c in ("plan", "provision", "configure", "register", "up", "down", "health")],
    ["remount"],
    ["reauth"],
    ["ui"],
]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sails-bootstrap", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_validate_example_and_malformed(tmp_path: Path) -> None:
    ok = run("config", "validate", "examples/arbutus.yaml")
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("volume:\n  size_gb: -5\n")
    result = run("config", "validate", str(bad))
    assert result.returncode != 0
    assert "volume.size_gb" in result.stderr


def test_show_fills_defaults_and_names() -> None:
    result = run("config", "show", "examples/arbutus.yaml")
    assert result.returncode == 0, result.stderr
    assert "image: Ubuntu-24.04-Noble-x64-2024-06" in result.stdout
    assert "server:  alma-sails-vm" in result.stdout


def test_blocks_register_against_a_real_server(prefect_server) -> None:  # type: ignore[no-untyped-def]
    result = run("blocks", "register", env=prefect_server.env())
    assert result.returncode == 0, result.stderr
    assert "ssh-key-pair" in result.stdout
    listed = subprocess.run(
        ["prefect", "block", "type", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, **prefect_server.env(), "COLUMNS": "200"},
        timeout=120,
    )
    assert "openstack-credentials" in listed.stdout
