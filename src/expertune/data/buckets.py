"""Aspect buckets: the training size of every image, and the crop that brings it there.

A *bucket* is a training size ``(height, width)`` in pixels. Each image goes to exactly one bucket,
decided by its own size and its dataset's `BucketRule` alone — never by the batch size or by the
other images — so a cached latent's key does not change when a job changes its batch size, and
stage 1 and stage 2 share every entry.

How ``resolution`` is read (``resolution_type``):

- ``pixel``: the shorter edge of the bucket, in pixels (1024 → a 1024 x 1024 square, or a
  1024-high landscape bucket);
- ``area``: megapixels, where 1 megapixel is 1024² pixels; SimpleTuner's round values keep their
  SimpleTuner meaning (0.25 → 512², 0.5 → 768², 1.0 → 1024², 2.0 → 1536², 4.0 → 2048²), any other
  value M means (1024·√M)²;
- ``pixel_area``: the edge of a square of the same area (1024 → about 1024² pixels, any aspect).

Bucket edges computed from an aspect ratio or an area are rounded to the nearest multiple of the
dataset's ``alignment`` (64 by default, at least one alignment step). With ``pixel`` the shorter
edge is ``resolution`` itself. Aspect ratios are clamped to [1/4, 4]: a longer panorama is cropped.

An image is scaled (LANCZOS) so it covers its bucket, then the excess is cut off. With
``crop_aspect: square`` the bucket is a square and the cut can be large; with ``preserve`` (or
``crop: false``) the bucket follows the image's own aspect ratio and the cut is only the rounding to
the alignment. ``crop_style`` places the cut: ``center``, ``corner`` (top-left) or ``random`` — an
offset drawn from SHA-256(seed, image content), so it is frozen with the latent it produced.
(``crop: false`` always centres the small rounding cut.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertune.data.transforms import CropPlan, plan_crop
from expertune.resolution import RESOLUTION_TYPES

CROP_ASPECTS = ("square", "preserve")
CROP_STYLES = ("center", "random", "corner")
ALIGNMENTS = (8, 16, 24, 32, 64)
DEFAULT_ALIGNMENT = 64
MAX_ASPECT = 4.0  # buckets span 1:4 .. 4:1; a longer image is cropped to that ratio
MEGAPIXEL = 1024 * 1024
# SimpleTuner's remapping of round megapixel values (resolution_type "area") to square edges.
MEGAPIXEL_EDGES = {0.25: 512, 0.5: 768, 1.0: 1024, 2.0: 1536, 4.0: 2048}

Size = tuple[int, int]  # (height, width) in pixels


def megapixel_edge(megapixels: float) -> float:
    """Edge of the square a ``resolution_type: area`` value stands for (not rounded)."""
    for value, edge in MEGAPIXEL_EDGES.items():
        if math.isclose(megapixels, value, rel_tol=0, abs_tol=1e-9):
            return float(edge)
    return 1024.0 * math.sqrt(megapixels)


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


@dataclass(frozen=True)
class BucketRule:
    """How one dataset sizes its images (the dataloader fields of the same names)."""

    resolution: float
    resolution_type: str = "pixel"
    crop: bool = True
    crop_aspect: str = "square"
    crop_style: str = "center"
    alignment: int = DEFAULT_ALIGNMENT
    minimum_image_size: float | None = None  # in the unit of resolution_type; None or 0: no minimum
    maximum_image_size: float | None = None  # in the unit of resolution_type; None: no maximum
    aspect_rounding: int | None = None  # decimal places aspect ratios are rounded to first

    def __post_init__(self) -> None:
        if self.resolution_type not in RESOLUTION_TYPES:
            raise ValueError(f"resolution_type must be one of {RESOLUTION_TYPES}, got {self.resolution_type!r}")
        if self.crop_aspect not in CROP_ASPECTS:
            raise ValueError(f"crop_aspect must be one of {CROP_ASPECTS}, got {self.crop_aspect!r}")
        if self.crop_style not in CROP_STYLES:
            raise ValueError(f"crop_style must be one of {CROP_STYLES}, got {self.crop_style!r}")
        if not self.resolution > 0 or self.alignment < 1:
            raise ValueError(f"resolution and alignment must be positive, got {self.resolution}, {self.alignment}")

    # -- measures -----------------------------------------------------------------------------------

    def target_area(self) -> float:
        """Pixels of the bucket area that ``resolution`` asks for."""
        if self.resolution_type == "area":
            return megapixel_edge(self.resolution) ** 2
        return float(self.resolution) ** 2

    def measure(self, size: Size) -> float:
        """An image's size in the unit of ``resolution_type`` (shorter edge, megapixels or area edge)."""
        height, width = size
        if self.resolution_type == "pixel":
            return float(min(height, width))
        if self.resolution_type == "pixel_area":
            return math.sqrt(height * width)
        return height * width / MEGAPIXEL

    def _limit_area_or_edge(self, limit: float) -> float:
        # "area" limits compare pixel areas through the same megapixel mapping as the resolution.
        return megapixel_edge(limit) ** 2 if self.resolution_type == "area" else limit

    def size_problem(self, size: Size) -> str | None:
        """Why an image of `size` is left out by minimum/maximum_image_size, or None when it is kept."""
        height, width = size
        unit = {"pixel": "shorter edge", "pixel_area": "equal-area square edge", "area": "megapixels"}[
            self.resolution_type
        ]
        measured = self.measure(size)
        compared = height * width if self.resolution_type == "area" else measured
        if self.minimum_image_size and compared < self._limit_area_or_edge(self.minimum_image_size):
            return (
                f"{width}x{height} is below minimum_image_size {self.minimum_image_size:g} "
                f"({unit} {measured:.4g}, resolution_type {self.resolution_type})"
            )
        if self.maximum_image_size and compared > self._limit_area_or_edge(self.maximum_image_size):
            return (
                f"{width}x{height} is above maximum_image_size {self.maximum_image_size:g} "
                f"({unit} {measured:.4g}, resolution_type {self.resolution_type})"
            )
        return None

    # -- buckets ------------------------------------------------------------------------------------

    def square_edge(self) -> int:
        """Edge of the square bucket (``crop_aspect: square``), and of square validation images."""
        if self.resolution_type == "pixel":
            return int(self.resolution)
        return _round_to(math.sqrt(self.target_area()), self.alignment)

    def bucket_for(self, size: Size) -> Size:
        """The (height, width) an image of `size` (height, width) is trained at."""
        height, width = (int(v) for v in size)
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        if self.crop and self.crop_aspect == "square":
            edge = self.square_edge()
            return (edge, edge)
        aspect = width / height
        if self.aspect_rounding is not None:
            aspect = round(aspect, self.aspect_rounding) or aspect
        aspect = min(MAX_ASPECT, max(1.0 / MAX_ASPECT, aspect))
        step = self.alignment
        if self.resolution_type == "pixel":
            short = int(self.resolution)
            long = _round_to(short * max(aspect, 1.0 / aspect), step)
            return (short, long) if aspect >= 1.0 else (long, short)
        area = self.target_area()
        return (_round_to(math.sqrt(area / aspect), step), _round_to(math.sqrt(area * aspect), step))

    def plan(self, size: Size, seed: int, image_key: str) -> CropPlan:
        """Resize and crop of an image of `size` into its bucket (the time ids come with it)."""
        style = self.crop_style if self.crop else "center"
        return plan_crop(size, self.bucket_for(size), style, seed, image_key)


def format_size(size: Size) -> str:
    """A bucket as people write it: width x height."""
    return f"{size[1]}x{size[0]}"
