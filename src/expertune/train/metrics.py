"""Where a run's numbers go: metrics.jsonl (one object per optimizer step, one per validation) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line in one write, so a crash loses at most the line being written; a full
    disk is a StorageError (exit 3) naming the file, with the torn line cut back (the run is its sole writer)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def write(self, record: dict[str, Any]) -> None:
        from expertune.io_utils import append_bytes

        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        append_bytes(self.path, (json.dumps(clean, sort_keys=True) + "\n").encode("utf-8"), sole_writer=True)

    def close(self) -> None:
        """Nothing is held open between lines."""


def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl of one kind; a torn last line (a crash mid-write) is ignored.

    `kind` "train": one object per optimizer step (lines without a "kind"); "validation": one object per
    validation (`"kind": "validation"`, with `eval/...` and `clip/...` numbers); "all": every line.
    """
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind == "all" or record.get("kind", "train") == kind:
            records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep only complete records up to `last_step` (a resumed run continues right after it).

    Rewritten atomically; drops a torn last line and the steps a crashed run logged after its checkpoint.
    """
    from expertune.io_utils import atomic_write_bytes

    target = Path(path)
    if not target.exists():
        return
    kept = [json.dumps(r, sort_keys=True) for r in read_metrics(target, kind="all")
            if int(r.get("step", 0)) <= last_step]
    atomic_write_bytes(target, ("\n".join(kept) + "\n" if kept else "").encode("utf-8"))
