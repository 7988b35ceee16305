"""`expertune audit`: the images a careful user would take out of a stage-2 set, per dataset.

Each image of each dataset (as `train` finds them: walk, listing or manifest, less its exclude file)
is opened once — a JPEG in draft mode, which still entropy-decodes every block, so truncation is
caught — and checked for:

- `unreadable`: cannot be fetched, opened or decoded;
- `no_caption`: its caption cannot be used (missing, empty, not UTF-8); training skips it anyway;
- `small`: below the dataset's training resolution (`resolution`, `resolution_type`);
- `compressed`: a JPEG whose quality, estimated from its quantisation tables against the IJG tables
  scaled by quality (`jpeg_quality`), is below `min_quality`;
- `aspect`: longer edge over shorter edge above `max_aspect`;
- `duplicate`: a near-duplicate of another image of the dataset (`dhash` within `max_hash_distance`
  bits); the largest image of a group is kept, the others are flagged;
- `dup_caption`: the caption is shared word for word with other images (a warning: not excluded;
  not checked for `instanceprompt` datasets, whose captions are one by design).

Nothing is written but the report and, when asked, an exclude file (`write_exclude`), which a
dataloader entry names with `"exclude_file"`. User files are never modified or deleted.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from expertune.data.dataloader import DatasetSpec
from expertune.data.file_index import INDEX_NAME, FileIndex
from expertune.data.mirror import fetch_records
from expertune.data.records import ImageRecord, discover_records
from expertune.io_utils import atomic_write_bytes

logger = logging.getLogger(__name__)

FLAGS = ("unreadable", "small", "compressed", "aspect", "duplicate", "no_caption", "dup_caption")
EXCLUDED_FLAGS = frozenset(FLAGS) - {"dup_caption"}  # what --write-exclude lists

# The IJG (libjpeg) example tables, Annex K of the JPEG standard, in natural (row-major) order.
IJG_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
IJG_CHROMINANCE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *([99] * 32),
)


def ijg_table(base: Sequence[int], quality: int) -> list[int]:
    """libjpeg's `jpeg_quality_scaling`: the table a quality of 1-100 writes (baseline: clamped to 1..255)."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((value * scale + 50) // 100, 1), 255) for value in base]


@functools.lru_cache(maxsize=1)
def _scaled_tables() -> np.ndarray:
    """[100, 128]: the luminance then chrominance table of each quality 1..100."""
    return np.array([ijg_table(IJG_LUMINANCE, q) + ijg_table(IJG_CHROMINANCE, q) for q in range(1, 101)],
                    dtype=np.int64)


def jpeg_quality(tables: dict[int, Sequence[int]]) -> int | None:
    """The IJG quality (1-100) whose scaled tables are nearest (sum of absolute differences) to `tables`
    (PIL's `image.quantization`, natural order), or None without a luminance table; a tie goes to the
    higher quality. Tables of other encoders map to their nearest IJG quality, which is what "how hard
    was it compressed" needs."""
    luminance = tables.get(0)
    if luminance is None or len(luminance) != 64:
        return None
    chrominance = tables.get(1)
    scaled = _scaled_tables()
    if chrominance is not None and len(chrominance) == 64:
        distance = np.abs(scaled - np.array([*luminance, *chrominance], dtype=np.int64)).sum(axis=1)
    else:
        distance = np.abs(scaled[:, :64] - np.array(luminance, dtype=np.int64)).sum(axis=1)
    best = np.flatnonzero(distance == distance.min())
    return int(best[-1]) + 1


def dhash(image: Image.Image, size: int = 8) -> int:
    """The difference hash: the image as (size+1) x size grey pixels (PIL's box filter), one bit per
    horizontal neighbour pair, set when the right pixel is brighter; bit 0 is the top-left pair."""
    grey = image.convert("L").resize((size + 1, size), Image.Resampling.BOX)
    pixels = grey.tobytes()
    bits = 0
    for row in range(size):
        for column in range(size):
            left = pixels[row * (size + 1) + column]
            right = pixels[row * (size + 1) + column + 1]
            if right > left:
                bits |= 1 << (row * size + column)
    return bits


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class AuditSettings:
    min_quality: int = 75  # JPEG quality below this is `compressed`
    max_aspect: float = 3.0  # longer / shorter edge above this is `aspect`
    max_hash_distance: int = 3  # dHash bits; at most 3 so the four-band search finds every pair
    workers: int = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class ImageFacts:
    """What one read of an image gives: size (h, w), JPEG quality, dHash, or why it cannot be read."""

    size: tuple[int, int] | None = None
    quality: int | None = None
    hash: int | None = None
    error: str | None = None


def inspect_image(path: Path) -> ImageFacts:
    """Open and decode `path` once (JPEGs in draft mode) and collect its facts; never raises for bad files."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            quality = jpeg_quality(image.quantization) if image.format == "JPEG" else None
            if image.format == "JPEG":
                image.draft("RGB", (max(64, width // 8), max(64, height // 8)))
            image.load()
            digest = dhash(image)
    except Exception as exc:  # PIL raises many kinds for a bad file; all mean "unreadable"
        return ImageFacts(error=f"{type(exc).__name__}: {exc}")
    return ImageFacts(size=(height, width), quality=quality, hash=digest)


def below_resolution(spec: DatasetSpec, size: tuple[int, int]) -> str | None:
    """Why an image of `size` (h, w) is smaller than the dataset trains at, or None."""
    height, width = size
    if spec.resolution_type == "area":
        if width * height < spec.resolution * 1_000_000:
            return f"{width}x{height} is {width * height / 1e6:.2f} MP, below the training area {spec.resolution:g} MP"
    elif spec.resolution_type == "pixel_area":
        if width * height < spec.resolution ** 2:
            return f"{width}x{height} has fewer pixels than {spec.resolution:g}x{spec.resolution:g}"
    elif min(width, height) < spec.resolution:
        return f"{width}x{height}: its shorter edge is below the training resolution {spec.resolution:g}"
    return None


@dataclass
class DatasetAudit:
    id: str
    images: int = 0
    seconds: float = 0.0
    flagged: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # name -> [(flag, detail)]

    def flag(self, name: str, kind: str, detail: str) -> None:
        self.flagged.setdefault(name, []).append((kind, detail))

    def counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in FLAGS}
        for flags in self.flagged.values():
            for kind in {kind for kind, _ in flags}:
                counts[kind] += 1
        return counts

    def excluded(self) -> list[str]:
        return sorted(name for name, flags in self.flagged.items() if any(k in EXCLUDED_FLAGS for k, _ in flags))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "images": self.images, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images / self.seconds, 1) if self.seconds > 0 else None,
            "counts": self.counts(), "to_exclude": len(self.excluded()),
            "flagged": {name: [{"flag": k, "detail": d} for k, d in flags] for name, flags in sorted(self.flagged.items())},
        }


def _name(spec: DatasetSpec, record: ImageRecord) -> str:
    """How a report and an exclude file name an image: its s3:// URL, or its path."""
    if record.stamp is not None and record.stamp.identity.startswith("s3://"):
        return record.stamp.identity
    return str(record.path)


def audit_dataset(spec: DatasetSpec, settings: AuditSettings, index: FileIndex | None = None) -> DatasetAudit:
    """One dataset's report; an `aws` entry's objects are fetched to its mirror (kept current via `index`)."""
    start = time.perf_counter()
    report = DatasetAudit(id=spec.id)
    index = index if index is not None else FileIndex(None)
    records, skipped = discover_records(spec, index)
    for path, reason in skipped:
        report.flag(str(path), "no_caption" if reason.startswith("caption file") or "caption" in reason.split(":")[0]
                    else "unreadable", reason)
    failures = fetch_records(spec, records, index) if spec.remote is not None else {}
    readable = []
    for record in records:
        if record.remote_key in failures:
            report.flag(_name(spec, record), "unreadable", failures[record.remote_key])
        else:
            readable.append(record)
    report.images = len(records) + len(skipped)
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        facts = list(pool.map(lambda record: inspect_image(record.path), readable))

    hashed: list[tuple[ImageRecord, ImageFacts]] = []
    for record, fact in zip(readable, facts):
        name = _name(spec, record)
        if fact.error is not None or fact.size is None:
            report.flag(name, "unreadable", fact.error or "no size")
            continue
        small = below_resolution(spec, fact.size)
        if small:
            report.flag(name, "small", small)
        if fact.quality is not None and fact.quality < settings.min_quality:
            report.flag(name, "compressed", f"JPEG quality about {fact.quality} (below {settings.min_quality})")
        height, width = fact.size
        aspect = max(width, height) / min(width, height)
        if aspect > settings.max_aspect:
            report.flag(name, "aspect", f"{width}x{height}: aspect {aspect:.2f} above {settings.max_aspect:g}")
        hashed.append((record, fact))

    for keep, others in near_duplicate_groups(
            [(_name(spec, r), f.hash, _pixels(f)) for r, f in hashed], settings.max_hash_distance):
        for other in others:
            report.flag(other, "duplicate", f"near-duplicate of {keep}")

    if spec.caption_strategy != "instanceprompt":
        by_caption: dict[str, list[str]] = defaultdict(list)
        for record in records:
            for caption in set(record.captions):
                by_caption[" ".join(caption.lower().split())].append(_name(spec, record))
        for caption, names in by_caption.items():
            if len(names) > 1:
                for name in names:
                    report.flag(name, "dup_caption", f"caption {caption[:60]!r} is shared by {len(names)} images")
    report.seconds = time.perf_counter() - start
    return report


def near_duplicate_groups(items: Sequence[tuple[str, int | None, int]], max_distance: int
                          ) -> list[tuple[str, list[str]]]:
    """Groups of (name, hash, pixels) within `max_distance` bits of each other: (kept, [others]) with
    the largest image kept. Candidates are found by four 16-bit bands of the hash (two hashes within 3
    bits share at least one band exactly), so the search is about linear in the number of images."""
    if max_distance > 3:
        raise ValueError("max_distance above 3 bits needs more bands than this search uses")
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, digest, _) in enumerate(items):
        if digest is None:
            continue
        for band in range(4):
            bands[(band, (digest >> (16 * band)) & 0xFFFF)].append(i)
    for members in bands.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1:]:
                if hamming(items[a][1], items[b][1]) <= max_distance:  # type: ignore[arg-type]
                    parent[root(b)] = root(a)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        if items[i][1] is not None:
            groups[root(i)].append(i)
    result = []
    for members in groups.values():
        if len(members) > 1:
            ordered = sorted(members, key=lambda i: (-items[i][2], items[i][0]))
            result.append((items[ordered[0]][0], [items[i][0] for i in ordered[1:]]))
    return sorted(result)


def format_report(reports: Sequence[DatasetAudit], *, details: bool = True) -> str:
    """A readable table (one row per dataset, one column per flag), then each flagged image."""
    width = max([len("dataset"), *(len(r.id) for r in reports)])
    header = f"{'dataset':<{width}}  {'images':>7}  " + "  ".join(f"{k:>10}" for k in FLAGS) + f"  {'exclude':>7}  {'img/s':>7}"
    lines = [header, "-" * len(header)]
    for report in reports:
        counts = report.counts()
        speed = f"{report.images / report.seconds:.0f}" if report.seconds > 0 else "-"
        lines.append(f"{report.id:<{width}}  {report.images:>7}  " + "  ".join(f"{counts[k]:>10}" for k in FLAGS)
                     + f"  {len(report.excluded()):>7}  {speed:>7}")
    if details:
        for report in reports:
            for name, flags in sorted(report.flagged.items()):
                lines.append(f"{report.id}: {name}: " + "; ".join(f"{k}: {d}" for k, d in flags))
    return "\n".join(lines)


def write_exclude(path: str | os.PathLike, reports: Sequence[DatasetAudit]) -> int:
    """Write every image with an excluding flag, one per line (atomically); the count. Name the file in
    each entry's `"exclude_file"`: paths are absolute, objects are s3:// URLs, so one file serves all."""
    names = sorted({name for report in reports for name in report.excluded()})
    text = "# written by expertune audit: images to leave out (name this file in an entry's \"exclude_file\")\n"
    atomic_write_bytes(path, (text + "".join(f"{name}\n" for name in names)).encode("utf-8"))
    return len(names)


def audit(datasets: Sequence[DatasetSpec], settings: AuditSettings, cache_dir: Path | None = None
          ) -> list[DatasetAudit]:
    """Every dataset's report, in file order (a bucket that cannot be used raises its DataError). With
    `cache_dir`, its file index is used and extended (caption texts, mirrored objects' versions)."""
    index = FileIndex(cache_dir / INDEX_NAME if cache_dir is not None else None)
    try:
        return [audit_dataset(spec, settings, index) for spec in datasets]
    finally:
        index.flush()


def _pixels(fact: ImageFacts) -> int:
    """The image's pixel count (0 for one whose size could not be read; those are flagged unreadable)."""
    return fact.size[0] * fact.size[1] if fact.size is not None else 0
