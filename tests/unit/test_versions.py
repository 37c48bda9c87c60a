"""Versions are pinned once, in pyproject.toml; the VM's libraries are read from there. A
version change of the VM's Prefect is an upgrade only where there is history to keep."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tasks.upgrade import Observed, decide_upgrade
from tasks.venvs import VM_LIBRARIES, vm_packages

ROOT = Path(__file__).resolve().parents[2]


def test_the_vms_libraries_are_the_versions_pyproject_pins() -> None:
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [next(p for p in pinned if p.startswith(f"{name}==")) for name in VM_LIBRARIES]
    assert vm_packages() == wanted


# -- an upgrade of the VM's Prefect: when, and when not -----------------------------------------


@pytest.mark.parametrize(
    ("installed", "set_up", "history", "action"),
    [
        (None, True, True, "none"),  # no venv (or a broken one): the venv step makes it
        ("3.6.29", False, False, "none"),  # nothing to keep: installed in place
        ("3.9.1", True, True, "none"),
        ("3.6.29", True, True, "upgrade"),
        ("3.9.1rc1", True, True, "upgrade"),
        ("3.10.0", True, True, "refuse"),  # Prefect does not migrate a database back
        ("3.6.29", False, True, "refuse"),  # a new VM on old data: its server first
    ],
)
def test_an_upgrade_only_where_a_server_with_history_runs_an_older_prefect(
    installed: str | None, set_up: bool, history: bool, action: str
) -> None:
    seen = Observed(installed=installed, server_set_up=set_up, history=history)
    decision = decide_upgrade(seen, "3.9.1")
    assert decision.action == action
    if action == "refuse":
        assert f"prefect.version: {installed}" in decision.reason
        assert "nothing was changed" in decision.reason
    if action == "upgrade":
        assert decision.reason == f"Prefect {installed} → 3.9.1"


def test_new_requirements_on_a_server_with_history_are_an_upgrade_of_their_own() -> None:
    seen = Observed(installed="3.9.1", server_set_up=True, history=True, requirements="a\n")
    assert decide_upgrade(seen, "3.9.1", "a").action == "none"  # (compared as text)
    changed = decide_upgrade(seen, "3.9.1", "a\nb\n")
    assert changed.action == "upgrade"
    assert changed.reason == "Prefect 3.9.1 with the operators' new requirements"
    assert decide_upgrade(seen, "3.9.1", None).action == "upgrade"  # dropped: a venv without
    # a server not set up yet on this VM has nothing running to keep: installed in place
    fresh = seen.model_copy(update={"server_set_up": False})
    assert decide_upgrade(fresh, "3.9.1", "b").action == "none"
