"""`pip install .` works: the wheel carries prefect.yaml, and `register` finds it there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIND = """
import json, tarfile, io
import tasks.code_on_vm as r
with tarfile.open(fileobj=io.BytesIO(r._tarball())) as tar:
    names = tar.getnames()
print(json.dumps({
    "module": r.__file__,
    "code_root": str(r.code_root()),
    "prefect_yaml": str(r.prefect_yaml()),
    "ops": (r.code_root() / "deployments" / "ops.py").exists(),
    "tarball": names,
}))
"""


def test_wheel_carries_prefect_yaml_and_register_finds_it(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    dist = tmp_path / "dist"
    subprocess.run(
        [uv, "build", "--wheel", "-o", str(dist)], cwd=ROOT, check=True, capture_output=True
    )
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = zf.read("deployments/prefect.yaml")
        assert "deployments/ops.py" in zf.namelist()
        assert "core/config.py" in zf.namelist()
        tops = {name.split("/")[0] for name in zf.namelist() if "/" in name}
        assert "sandbox" not in tops, "the sandbox is a project of its own, not in the wheel"
    assert packaged == (ROOT / "prefect.yaml").read_bytes()

    # Installed from the wheel into a new venv (its dependencies from this environment).
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        [uv, "pip", "install", "-q", "--no-deps", "--python", str(venv / "bin/python"), str(wheel)],
        check=True,
    )
    found = subprocess.run(
        [str(venv / "bin/python"), "-c", FIND],
        cwd=tmp_path,
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(found.stdout.strip().splitlines()[-1])
    site = Path(info["code_root"])
    assert site.is_relative_to(venv) and Path(info["module"]).is_relative_to(venv), info
    assert Path(info["prefect_yaml"]) == site / "deployments" / "prefect.yaml"
    assert info["ops"], "deploy runs from code_root(): the entrypoints must be there"
    assert "prefect.yaml" in info["tarball"] and "deployments/ops.py" in info["tarball"]
