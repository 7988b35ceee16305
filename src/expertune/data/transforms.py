"""Resize, crop and SDXL micro-conditioning for square training crops.

The shorter side is scaled to `resolution` (LANCZOS), then a `resolution`-square is cut out: from
the centre, the top-left corner, or a place drawn from (seed, image key) alone — never from a
global random generator — so the same image always gets the same crop and the same cached latent.
The `CropPlan` carries what SDXL's time ids need: the original size, the crop's top-left corner and
the target size (REFERENCE.md §3).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from expertune.errors import DataError

RESAMPLE = Image.Resampling.LANCZOS
RESAMPLE_NAME = "lanczos"  # part of every latent cache key: change it when the resize changes

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # these rotate by 90 degrees: height and width swap


@dataclass(frozen=True)
class CropPlan:
    original_size: tuple[int, int]  # (h, w) of the file as decoded (EXIF orientation applied)
    resized_size: tuple[int, int]  # (h, w) after scaling the shorter side to `resolution`
    crop_top_left: tuple[int, int]  # (top, left) in resized coordinates
    target_size: tuple[int, int]  # (resolution, resolution)

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's `add_time_ids`: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def plan_crop(
    original_size: tuple[int, int], resolution: int, crop_style: str, seed: int, image_key: str
) -> CropPlan:
    """Where a `resolution`-square crop of an image of `original_size` (h, w) comes from.

    The resized size rounds to the nearest pixel and is never below `resolution`. `center` puts the
    crop at `(extra // 2)` on each axis, `corner` at (0, 0), `random` at offsets drawn from a
    SHA-256 of (seed, image_key): deterministic, independent of any global RNG and of call order.
    """
    height, width = (int(v) for v in original_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"original_size must be positive, got {original_size}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    scale = resolution / min(height, width)
    resized = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    extra_h, extra_w = resized[0] - resolution, resized[1] - resolution
    if crop_style == "center":
        top_left = (extra_h // 2, extra_w // 2)
    elif crop_style == "corner":
        top_left = (0, 0)
    elif crop_style == "random":
        digest = hashlib.sha256(json.dumps([int(seed), str(image_key)]).encode("utf-8")).digest()
        draw_h, draw_w = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")
        top_left = (draw_h % (extra_h + 1), draw_w % (extra_w + 1))
    else:
        raise ValueError(f"crop_style must be one of center, random, corner; got {crop_style!r}")
    return CropPlan(
        original_size=(height, width),
        resized_size=resized,
        crop_top_left=top_left,
        target_size=(resolution, resolution),
    )


def _failure(path: os.PathLike | str, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}). Replace or remove the file.")


_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(h, w) of the image as `load_image` will return it, reading only the header and EXIF."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except _READ_ERRORS as exc:
        raise _failure(path, exc) from exc
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image as RGB with its EXIF orientation applied.

    Transparent pixels are composited onto white (their hidden colour is often black noise).
    Raises DataError naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return image.convert("RGB")
    except _READ_ERRORS as exc:
        raise _failure(path, exc) from exc


def image_to_tensor(image: Image.Image, plan: CropPlan) -> torch.Tensor:
    """Resize and crop `image` by `plan`: float32 [3, H, W] in [-1, 1]."""
    expected = (plan.original_size[1], plan.original_size[0])
    if image.size != expected:
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} (w x h), the plan expects {expected[0]}x{expected[1]}"
        )
    resized_h, resized_w = plan.resized_size
    top, left = plan.crop_top_left
    target_h, target_w = plan.target_size
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size != (resized_w, resized_h):
        rgb = rgb.resize((resized_w, resized_h), resample=RESAMPLE)
    cropped = rgb.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
