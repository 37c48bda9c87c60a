"""The house's layers, read from the import statements: no arrow runs back up.

core (config model, errors, records, logging) → blocks → tasks (steps) → flows → deployments,
with the CLI (sails_bootstrap) alone on top. The product never imports the sandbox or the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"core", "blocks", "tasks", "flows", "deployments", "sails_bootstrap", "sandbox", "tests"}
#: What each product package may import of ours (besides itself).
ALLOWED = {
    "core": set(),
    "blocks": {"core"},
    "tasks": {"core", "blocks"},
    "flows": {"core", "blocks", "tasks"},
    "deployments": {"core", "blocks", "tasks", "flows"},
    "sails_bootstrap": {"core", "blocks", "tasks", "flows", "deployments"},
}


def imports_of(path: Path) -> set[str]:
    """Top-level packages of ours a module imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & OURS
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_back_up(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imports_of(path) - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong


def test_the_reader_sees_the_imports(tmp_path: Path) -> None:
    """The check above reads what it should: a step importing a flow, at the top or inside a
    function, would be caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from flows.provision import provision\n\ndef f():\n    import sandbox.net\n")
    assert imports_of(probe) == {"flows", "sandbox"}
    assert imports_of(ROOT / "tasks" / "access.py") >= {"core", "blocks", "tasks"}


#: Rooms small enough to read in one sitting.
MAX_LINES = 400


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_product_module_is_over_the_limit(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these along their seams: {long}"
