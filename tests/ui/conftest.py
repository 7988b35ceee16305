"""Fixtures of the UI's tests: a workspace of run folders, and a live server over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ui_helpers import Served, serve, write_run


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """Two finished runs (stage 1 and stage 2 bands), one still writing, a damaged one and a foreign folder."""
    ws = tmp_path / "ws"
    write_run(ws / "stage1", 6, finished=True)
    write_run(ws / "stage2", 6, finished=True, band=(0, 349))
    write_run(ws / "sweep" / "going", 3, finished=False)
    damaged = ws / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"steps": 4, "expe', encoding="utf-8")  # half-written
    foreign = ws / "foreign"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("this is not json\n[1, 2]\n", encoding="utf-8")
    return ws


@pytest.fixture
def served(workspace: Path) -> Iterator[Served]:
    yield from serve(workspace)
