"""metrics.jsonl: one whole line per record; a full disk is a clean stop (exit 3) with no torn line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertune.errors import StorageError
from expertune.train.metrics import MetricsLog, read_metrics


def test_lines_are_whole_json_objects_and_non_finite_is_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.write({"kind": "train", "step": 1, "loss": 0.5})
    log.write({"kind": "train", "step": 2, "loss": float("nan")})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"kind": "train", "loss": 0.5, "step": 1},
                                                    {"kind": "train", "loss": None, "step": 2}]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_full_disk_is_a_storage_error_and_leaves_no_torn_line(small_disk) -> None:  # type: ignore[no-untyped-def]
    path = small_disk.path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"kind": "train", "step": 1, "loss": 0.25})
    before = path.read_bytes()
    small_disk.fill(leave=0)
    with pytest.raises(StorageError, match="metrics.jsonl"):
        log.write({"kind": "train", "step": 2, "note": "x" * 65536})  # more than any page left
    assert path.read_bytes() == before  # the partial line was cut back
    assert StorageError("x").exit_code == 3
