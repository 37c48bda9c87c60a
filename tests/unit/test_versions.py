"""Versions are pinned once, in pyproject.toml; the VM's libraries are read from there."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tasks.venvs import VM_LIBRARIES, vm_packages

ROOT = Path(__file__).resolve().parents[2]


def test_the_vms_libraries_are_the_versions_pyproject_pins() -> None:
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [next(p for p in pinned if p.startswith(f"{name}==")) for name in VM_LIBRARIES]
    assert vm_packages() == wanted
