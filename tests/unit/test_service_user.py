"""The service user's one sudo rule: a helper that acts on the environment's own units only.

Its refusals run here as they run on the VM (a refused call never reaches systemctl); what it
allows is run on real guests (tests/sandbox/test_configure.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.config import BootstrapConfig
from tasks.service_user import as_service_user, helper_text, sudoers_text


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    path = tmp_path / "sails-units"
    path.write_text(helper_text())
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("verb", "unit", "said"),
    [
        ("restart", "ssh.service", "not a unit of this environment"),
        ("stop", "systemd-journald.service", "not a unit of this environment"),
        ("restart", "prefect-worker@x;id.service", "no unit named"),
        ("restart", "prefect-worker@$(id).service", "no unit named"),
        ("restart", "../../prefect-server.service", "no unit named"),
        ("restart", "prefect-server.service x", "no unit named"),
        ("restart", "", "no unit named"),
        ("enable", "prefect-server.service", "usage"),
        ("mask", "sails-arc.service", "usage"),
        ("edit", "prefect-worker@vm-runs.service", "usage"),
        ("", "prefect-server.service", "usage"),
    ],
)
def test_the_helper_refuses_what_is_not_its_own(
    helper: Path, verb: str, unit: str, said: str
) -> None:
    r = subprocess.run([str(helper), verb, unit], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and said in r.stderr, (r.returncode, r.stderr)


def test_the_rule_names_the_helper_alone() -> None:
    cfg = BootstrapConfig()
    lines = [line for line in sudoers_text(cfg).splitlines() if not line.startswith("#")]
    assert lines == ["sails ALL=(root) NOPASSWD: /usr/local/sbin/sails-units"]


def test_a_command_as_the_service_user_runs_as_is_when_already_that_user() -> None:
    import getpass

    cfg = BootstrapConfig()
    me = cfg.prefect.model_copy(update={"user": getpass.getuser()})
    cfg = cfg.model_copy(update={"prefect": me})
    command = as_service_user(cfg, 'echo "it\'s $(id -un)"; exit 3')
    r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=10)
    assert (r.returncode, r.stdout) == (3, f"it's {getpass.getuser()}\n")
