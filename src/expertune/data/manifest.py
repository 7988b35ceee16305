"""Manifests: a dataset described by one file of (path or key, caption, width, height) rows.

A dataset entry with `"manifest": "FILE"` (`.jsonl`, `.csv` or `.parquet`) is not walked or listed:
its images are the manifest's rows, so discovery of a million images is one read of one file. Columns:

- `path` (or `key`, `file_name`, `image`): the image, relative to `instance_data_dir` — or, for an
  `aws` entry, to `aws_data_prefix` (an absolute local path is used as it is);
- `caption` (optional): the caption; in JSONL a list of strings is several captions. A row without one
  takes the entry's `caption_strategy` (a `textfile` then reads the sibling `.txt`);
- `width`, `height` (optional, pixels): recorded on the record; `expertune audit` uses them to flag small
  images without opening the file. The file's own header stays authoritative for training.

A row that cannot be used (no path, a local path outside the dataset, a bad width) is a DataError naming the
manifest, the line and the fix: a manifest is written by a program, and a wrong one should stop the run. An
`aws` row is an object key: one that cannot be mirrored under the dataset (an absolute, empty, `.` or `..`
component, a name too long for the file system; `paths.contained_path`) is skipped and listed, as a key of a
listed bucket is.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from expertune.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_FORMATS = (".jsonl", ".csv", ".parquet")
PATH_COLUMNS = ("path", "key", "file_name", "image")


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest: its path relative to the dataset (or absolute), captions, declared size."""

    line: int  # 1-based line (JSONL, CSV: counting the header) or row number (Parquet)
    path: str
    captions: tuple[str, ...] | None  # None: the row has no caption column or an empty cell
    width: int | None = None
    height: int | None = None


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number} is not JSON ({exc.msg}). Fix or remove that line.") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {number} must be a JSON object, got {type(row).__name__}.")
                yield number, row
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as stream:
            for number, row in enumerate(csv.DictReader(stream), start=2):
                yield number, row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise DataError(f"{path}: reading a Parquet manifest needs pyarrow. Install it (pip install "
                            "'expertune[parquet]') or write the manifest as JSONL or CSV.") from None
        number = 0
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=65_536):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    else:
        raise DataError(f"{path}: a manifest must be {', '.join(MANIFEST_FORMATS)}; got {suffix or 'no suffix'}. "
                        "Rename or convert it.")


def _size(path: Path, number: int, row: dict[str, Any], column: str) -> int | None:
    value = row.get(column)
    if value is None or value == "":
        return None
    try:
        size = int(float(value))
    except (TypeError, ValueError):
        size = 0
    if size <= 0 or float(value) != size:
        raise DataError(f"{path}: line {number}: {column} must be a whole number of pixels > 0, got {value!r}. "
                        "Fix it or leave the cell empty.")
    return size


def _captions(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    captions = tuple(" ".join(str(item).split()) for item in items if item is not None and str(item).strip())
    return captions or None


def read_manifest(path: str | os.PathLike, *, remote: bool = False) -> list[ManifestRow]:
    """Every row of the manifest, in file order; DataError naming the file and line on a bad row.

    `remote`: the paths are object keys relative to the prefix, kept as written: where each is mirrored is
    decided by `paths.contained_path` (through `S3Dataset.local_path`), which refuses — skips and lists — a row
    that would leave the mirror.
    """
    source = Path(path)
    rows: list[ManifestRow] = []
    try:
        for number, row in _rows(source):
            column = next((name for name in PATH_COLUMNS if row.get(name) not in (None, "")), None)
            if column is None:
                raise DataError(f"{source}: line {number} has no image path (a column named one of "
                                f"{', '.join(PATH_COLUMNS)}). Add it.")
            value = str(row[column])
            relative = PurePosixPath(value)
            if not remote and ".." in relative.parts:
                raise DataError(f"{source}: line {number}: path {value!r} leaves the dataset folder. Give it "
                                "relative to instance_data_dir (or aws_data_prefix), without '..'.")
            rows.append(ManifestRow(line=number, path=value, captions=_captions(row.get("caption")),
                                    width=_size(source, number, row, "width"),
                                    height=_size(source, number, row, "height")))
    except FileNotFoundError:
        raise DataError(f"{source}: manifest not found. Fix the entry's \"manifest\" path.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{source}: cannot read the manifest ({exc}). Check the file.") from None
    except Exception as exc:  # pyarrow's own errors for a damaged Parquet file
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"{source}: cannot read the Parquet manifest ({exc}). Check the file.") from None
        raise
    logger.info("%s: %d images in the manifest", source, len(rows))
    return rows
