"""The suite's own rules, checked: a unit test that trains or launches fails (tests/conftest.py), and no test
passes by returning early instead of skipping with its reason."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest


def test_a_unit_test_that_starts_a_process_fails_with_the_fix() -> None:
    with pytest.raises(pytest.fail.Exception, match="starts a process but is not marked integration"):
        subprocess.run(["true"], check=False)


def test_a_unit_test_that_trains_fails_with_the_fix() -> None:
    from expertune.train import loop

    with pytest.raises(pytest.fail.Exception, match="trains an expert but is not marked integration"):
        loop.train_step(None, None)  # type: ignore[arg-type]


@pytest.mark.integration
def test_an_integration_test_may_start_a_process() -> None:
    assert subprocess.run(["true"], check=False).returncode == 0


def _returns(body: list[ast.stmt]) -> list[ast.Return]:
    """The `return` statements of a function body, not those of functions or classes defined inside it."""
    found: list[ast.Return] = []
    pending: list[ast.AST] = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Return):
            found.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))
    return found


def _early_returns(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{ret.lineno} in {node.name}" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
            for ret in _returns(node.body) if ret is not node.body[-1]]


def test_no_test_returns_early_instead_of_skipping() -> None:
    """A test that returns early passes without checking anything; `pytest.skip("reason")` says why it did not run."""
    tests = Path(__file__).parent
    found = [hit for path in sorted(tests.rglob("test_*.py")) for hit in _early_returns(path)]
    assert found == []
