"""A run's validation images as a prompt x step grid per expert and for the chain, and their thumbnails.

Images live in `validation/step_NNNNNN/<name>.png` (one expert) or `validation/step_NNNNNN/expert_<k>/<name>.png`
(a mixture). `chain_*` images are the whole chain; a stage-2 `partial_denoise_*` image is its input | noised |
output grid. The CLIP score of an image is the validation row's `clip/<name>`.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path

from expertune.ui.metrics import MetricColumns

STEP_FOLDER = re.compile(r"^step_(\d+)$")
EXPERT_FOLDER = re.compile(r"^expert_(\d+)$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def gallery(run_dir: Path, workspace: Path, columns: MetricColumns) -> dict[str, object]:
    """{"groups": [{"name": "expert 0" | "chain", "rows": [{"image": name, "cells": {step: path}}]}],
    "steps": [...], "clip": {step: {name: score}}}. Paths are relative to the workspace."""
    root = run_dir / "validation"
    groups: dict[str, dict[str, dict[int, str]]] = {}
    steps: set[int] = set()
    try:
        step_dirs = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_FOLDER.match(p.name)) and p.is_dir()]
    except OSError:
        step_dirs = []
    for step, folder in step_dirs:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        places = [(0, folder)] + [(int(m.group(1)), e) for e in entries if (m := EXPERT_FOLDER.match(e.name))]
        for expert, place in places:
            try:
                images = [p for p in place.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            except OSError:
                continue
            for image in images:
                group = "chain" if image.stem.startswith("chain_") else f"expert {expert}"
                groups.setdefault(group, {}).setdefault(image.stem, {})[step] = image.relative_to(workspace).as_posix()
                steps.add(step)
    clip: dict[int, dict[str, float]] = {}
    for row in columns.validation:
        scores = {k[5:]: float(v) for k, v in row.items() if k.startswith("clip/") and k != "clip/mean"}
        if scores:
            clip.setdefault(int(row["step"]), {}).update(scores)
    ordered = sorted(groups, key=lambda g: (g == "chain", g))
    return {"steps": sorted(steps),
            "groups": [{"name": g, "rows": [{"image": name, "cells": {str(s): p for s, p in sorted(cells.items())}}
                                            for name, cells in sorted(groups[g].items())]} for g in ordered],
            "clip": {str(s): v for s, v in sorted(clip.items())}}


class Thumbnails:
    """Downscaled PNG/JPEG bytes of images, kept in memory (least recently used dropped first)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._cache: OrderedDict[tuple[Path, int, int], tuple[bytes, str]] = OrderedDict()
        self._capacity = capacity
        self._guard = threading.Lock()

    def get(self, path: Path, width: int) -> tuple[bytes, str]:
        """(bytes, content type) of `path` at most `width` pixels wide; raises OSError/ValueError on a bad file."""
        key = (path, width, path.stat().st_mtime_ns)
        with self._guard:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        made = encode_thumbnail(path, width)
        with self._guard:
            self._cache[key] = made
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return made


def encode_thumbnail(path: Path, width: int, *, jpeg: bool = False) -> tuple[bytes, str]:
    """`path` scaled to at most `width` px wide (aspect kept), as PNG (or JPEG, smaller, for reports)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        picture = image.convert("RGB") if jpeg or image.mode not in ("RGB", "RGBA", "L") else image.copy()
    if picture.width > width:
        picture = picture.resize((width, max(1, round(picture.height * width / picture.width))), Image.LANCZOS)
    buffer = io.BytesIO()
    if jpeg:
        picture.save(buffer, "JPEG", quality=82)
        return buffer.getvalue(), "image/jpeg"
    picture.save(buffer, "PNG", optimize=False)
    return buffer.getvalue(), "image/png"
