"""The image records of one dataset: every image of its directory paired with its captions.

`discover_records` walks one dataset's directory (a `DatasetSpec` of `data.dataloader`) and pairs every
image with its captions; what it leaves out is logged and returned with the reason. See docs/datasets.md.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from expertune.data.dataloader import CAPTION_STRATEGIES, DatasetSpec
from expertune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    captions: tuple[str, ...]
    dataset_id: str


class SkippedImage(NamedTuple):
    """An image `discover_records` left out, and why (already logged); unpacks as (path, reason)."""

    path: Path
    reason: str


class Discovery(NamedTuple):
    """What `discover_records` found: `records, skipped = discover_records(spec)`."""

    records: list[ImageRecord]
    skipped: list[SkippedImage]


# --------------------------------------------------------------------------------------------------
# Records


def _image_paths(directory: Path) -> list[Path]:
    """Images under `directory`, recursively, following links once; hidden names are skipped."""
    found: list[Path] = []
    visited: set[str] = set()
    for root, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink cycle or a second link to the same folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(root) / name)
    return sorted(found)


def _caption_from_filename(path: Path) -> str:
    return " ".join(re.sub(r"[_-]", " ", path.stem).split())


def _captions_from_textfile(path: Path) -> tuple[tuple[str, ...], str | None]:
    """(captions, None) or ((), reason) for the sibling `<stem>.txt` of `path`."""
    caption_file = path.with_suffix(".txt")
    try:
        text = caption_file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return (), f"caption file {caption_file} is missing"
    except UnicodeDecodeError as exc:
        return (), f"caption file {caption_file} is not UTF-8 ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        return (), f"caption file {caption_file} cannot be read ({exc.strerror or exc})"
    captions = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not captions:
        return (), f"caption file {caption_file} is empty"
    return captions, None


def discover_records(spec: DatasetSpec) -> Discovery:
    """Every image of `spec` that has a caption, sorted by path; skipped images and why.

    Raises DataError when the directory holds no image file at all (a wrong `instance_data_dir`). A
    dataset whose every image is skipped is returned empty, with a warning: the run goes on while
    another dataset has usable images (`prepare_data` stops when none has).
    """
    records: list[ImageRecord] = []
    skipped: list[SkippedImage] = []
    paths = _image_paths(spec.instance_data_dir)
    for path in paths:
        reason: str | None = None
        if spec.caption_strategy == "textfile":
            captions, reason = _captions_from_textfile(path)
        elif spec.caption_strategy == "filename":
            caption = _caption_from_filename(path)
            captions = (caption,) if caption else ()
            reason = None if caption else f"file name {path.name} gives an empty caption"
        elif spec.caption_strategy == "instanceprompt":
            assert spec.instance_prompt is not None
            captions = (spec.instance_prompt,)
        else:  # load_dataloader_config rejects these; a hand-built spec may not
            raise ConfigError(
                f"dataset {spec.id!r}: caption_strategy {spec.caption_strategy!r} is not supported. "
                f"Use one of {', '.join(CAPTION_STRATEGIES)}."
            )
        if reason is not None:
            logger.warning("dataset %r: skipping %s: %s", spec.id, path, reason)
            skipped.append(SkippedImage(path=path, reason=reason))
        else:
            records.append(ImageRecord(path=path, captions=captions, dataset_id=spec.id))

    if not paths:
        raise DataError(
            f"dataset {spec.id!r}: {spec.instance_data_dir} has no usable image: no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) found. Add images or fix instance_data_dir."
        )
    if not records:
        logger.warning(
            "dataset %r: all %d images in %s were skipped (first: %s: %s)",
            spec.id, len(paths), spec.instance_data_dir, skipped[0].path, skipped[0].reason,
        )
    return Discovery(records=records, skipped=skipped)
