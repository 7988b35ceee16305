"""metrics.jsonl as columns, read incrementally (a run only appends) and downsampled for charts.

A training row: `step`, `loss`, `lr`, `grad_norm`, `seconds` (and `expert` in a mixture); a validation row:
`"kind": "validation"` with `eval/...` and `clip/...` numbers. A torn last line (a run still writing, or killed)
is left for the next read; a file that shrank or was replaced (a resume drops lines) is read again from the start.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

TRAINING_KEYS = ("loss", "lr", "grad_norm")
Number = float | int


@dataclass
class MetricColumns:
    """What one metrics.jsonl holds so far."""

    training: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # expert -> key -> values ("step" too)
    validation: list[dict[str, Number]] = field(default_factory=list)
    bad_lines: int = 0
    last_step: int = 0
    recent_seconds: list[float] = field(default_factory=list)  # `seconds` of the last training rows

    def add(self, row: dict[str, object]) -> None:
        step = row.get("step")
        if not isinstance(step, int):
            self.bad_lines += 1
            return
        if row.get("kind") == "validation":
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.validation.append(numbers)
            return
        expert = row.get("expert", 0)
        columns = self.training.setdefault(int(expert) if isinstance(expert, int) else 0,
                                           {"step": [], **{k: [] for k in TRAINING_KEYS}})
        columns["step"].append(float(step))
        for key in TRAINING_KEYS:
            value = row.get(key)
            columns[key].append(float(value) if isinstance(value, (int, float)) else math.nan)
        self.last_step = max(self.last_step, step)
        seconds = row.get("seconds")
        if isinstance(seconds, (int, float)):
            self.recent_seconds.append(float(seconds))
            if len(self.recent_seconds) > 200:
                del self.recent_seconds[:100]


@dataclass
class _Cached:
    identity: tuple[int, int]  # (device, inode)
    offset: int
    columns: MetricColumns
    lock: threading.Lock = field(default_factory=threading.Lock)


class MetricsReader:
    """Reads each metrics.jsonl once and then only what was appended (shared by every request)."""

    def __init__(self) -> None:
        self._cache: dict[Path, _Cached] = {}
        self._guard = threading.Lock()

    def read(self, path: Path) -> MetricColumns:
        try:
            status = path.stat()
        except OSError:
            return MetricColumns()
        identity = (status.st_dev, status.st_ino)
        with self._guard:
            cached = self._cache.get(path)
            if cached is None or cached.identity != identity or status.st_size < cached.offset:
                cached = self._cache[path] = _Cached(identity, 0, MetricColumns())
        with cached.lock:
            if status.st_size > cached.offset:
                cached.offset = _read_from(path, cached.offset, cached.columns)
            return cached.columns


def _read_from(path: Path, offset: int, columns: MetricColumns) -> int:
    """Parse the complete lines after `offset`; returns the offset after the last complete line."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except OSError:
        return offset
    end = data.rfind(b"\n")
    if end < 0:
        return offset
    lines = [line for line in data[:end].split(b"\n") if line.strip()]
    try:  # one parse of the whole chunk (about twice as fast as a parse per line) ...
        rows = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:  # ... and line by line when some line is bad
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                columns.bad_lines += 1
    for row in rows:
        if isinstance(row, dict):
            columns.add(row)
        else:
            columns.bad_lines += 1
    return offset + end + 1


def downsample(steps: list[float], values: list[float], points: int) -> dict[str, list[float | None]]:
    """At most `points` buckets of consecutive rows: each bucket's step (its last), mean, min and max. Non-finite
    values are left out of a bucket (a bucket of only those gives None)."""
    count = len(steps)
    size = max(1, math.ceil(count / max(points, 1)))
    out: dict[str, list[float | None]] = {"step": [], "mean": [], "min": [], "max": []}
    for start in range(0, count, size):
        chunk = [v for v in values[start:start + size] if math.isfinite(v)]
        out["step"].append(steps[min(start + size, count) - 1])
        if chunk:
            out["mean"].append(sum(chunk) / len(chunk))
            out["min"].append(min(chunk))
            out["max"].append(max(chunk))
        else:
            out["mean"].append(None)
            out["min"].append(None)
            out["max"].append(None)
    return out


def chart_data(columns: MetricColumns, points: int = 600) -> dict[str, object]:
    """The series a run page draws: training loss / lr / grad norm per expert (downsampled), and every validation
    number over steps (downsampled to `points` validations)."""
    training = {
        str(expert): {key: downsample(cols["step"], cols[key], points) for key in TRAINING_KEYS}
        for expert, cols in sorted(columns.training.items())
    }
    validation = columns.validation
    if len(validation) > points:
        stride = math.ceil(len(validation) / points)
        validation = validation[::stride] + ([validation[-1]] if (len(validation) - 1) % stride else [])
    return {"training": training, "validation": validation, "last_step": columns.last_step,
            "bad_lines": columns.bad_lines}


def file_version(path: Path) -> str:
    """Changes whenever the file does (size and modification time): what a live page polls for."""
    try:
        status = os.stat(path)
    except OSError:
        return "none"
    return f"{status.st_size}-{status.st_mtime_ns}"
