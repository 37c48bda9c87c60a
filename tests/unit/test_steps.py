"""The task wrappers: applied in flows/steps.py only, each to its plain step, and found from the
plain step by the runners that compose the cloud's steps."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from prefect import task

import flows.steps as steps
from core.config import parse_config
from flows.steps import WRAPPERS, timed, wrapper
from tasks.cloud.converge import Done, converge

ROOT = Path(__file__).resolve().parents[2]
#: converge's steps by their task names, in the order it hands them to its runner (the bench
#: reads their times under these names).
CONVERGED = [
    "ensure-keypair",
    "ensure-security-group",
    "ensure-volume",
    "reserve-floating-ip",
    "ensure-server",
    "ensure-floating-ip",
    "ensure-attachment",
]


def wraps(path: Path) -> list[str]:
    """Where a module imports Prefect's task wrapper, or decorates with a ``task``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in ("prefect", "prefect.tasks"):
            found += [f"imports {a.name}" for a in node.names if a.name in ("task", "Task")]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for d in node.decorator_list:
                called = d.func if isinstance(d, ast.Call) else d
                if isinstance(called, ast.Name | ast.Attribute) and ast.unparse(called) in (
                    "task",
                    "prefect.task",
                ):
                    found.append(f"@task on {node.name}")
    return found


def test_steps_are_wrapped_in_flows_steps_only() -> None:
    modules = sorted((ROOT / "tasks").rglob("*.py")) + sorted((ROOT / "flows").glob("*.py"))
    wrapping = {
        str(p.relative_to(ROOT)): w
        for p in modules
        if p != ROOT / "flows" / "steps.py"
        if (w := wraps(p))
    }
    assert not wrapping, wrapping


def test_the_reader_sees_a_wrapper(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from prefect import task\n\n@task(name='x')\ndef f():\n    pass\n")
    assert wraps(probe) == ["imports task", "@task on f"]


def test_each_wrapper_runs_its_plain_step_under_the_same_name() -> None:
    names = [t.name for t in WRAPPERS.values()]
    assert len(names) == len(set(names)), names
    for step, wrapped in WRAPPERS.items():
        assert wrapped.fn is step
        assert step.__module__.startswith("tasks.")
        assert getattr(steps, step.__name__) is wrapped, step.__name__


def test_converge_hands_the_runner_plain_steps_it_can_find() -> None:
    seen: list[str] = []

    def recording(step: Any, *args: Any, wait_for: list[Any] | None = None) -> Done[None]:
        seen.append(wrapper(step).name)
        return Done(None)

    converge(None, parse_config({}), None, None, apply=False, run=recording)  # type: ignore[arg-type]
    assert seen == CONVERGED


def test_timed_notes_each_step_under_its_task_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def plain(a: int, b: int) -> int:
        return a + b

    monkeypatch.setitem(WRAPPERS, plain, task(name="add-them")(plain))
    durations: dict[str, float] = {}
    first = timed(durations)(plain, 1, 2)
    assert timed(durations)(plain, first, 3).result() == 6
    assert list(durations) == ["add-them"]


def test_a_step_without_a_wrapper_is_named() -> None:
    def stray() -> None: ...

    with pytest.raises(LookupError, match=r"stray is not wrapped in flows/steps\.py"):
        wrapper(stray)
