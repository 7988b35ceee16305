"""Decode, resize and crop images, and the SDXL micro-conditioning of each crop.

`plan_crop` scales an image so it covers its target size (LANCZOS), then cuts the excess from the
centre, the top-left corner, or a place drawn from (seed, image key) alone — never from a global
random generator — so the same image always gets the same crop and the same cached latent. Which
target size an image gets is the aspect buckets' business (`expertune.data.buckets`). The `CropPlan`
carries what SDXL's time ids need: the original size, the crop's top-left corner and the target size
(REFERENCE.md §3).

Decoding is defensive: the file's header is read first and an image over `MAX_IMAGE_PIXELS` is
refused before any pixel is decoded (decompression bombs); unusual modes are converted to RGB the
right way (16-bit scaled, not clipped; CMYK through its ICC profile; transparency onto white).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without littlecms: CMYK falls back to PIL's plain formula
    ImageCms = None  # type: ignore[assignment]

from expertune.errors import DataError

RESAMPLE = Image.Resampling.LANCZOS
RESAMPLE_NAME = "lanczos"  # part of every latent cache key: change it when the resize changes
# Part of every latent cache key: bump it when `load_image` decodes any file differently.
DECODE_VERSION = "rgb8-v2"  # v2: 16-bit scaled, CMYK via ICC, any transparency composited onto white

# Images with more pixels than this are refused from their header alone, before decoding: a few-KB
# PNG can claim 50,000 x 50,000 pixels (a "decompression bomb") and take 10 GB to decode. 2**27
# (134 megapixels, e.g. 16384 x 8192) is far above any training resolution. PIL's own guard is set
# to the same value (it warns above it and raises above twice it); expertune checks first and skips
# the image with a warning naming the file.
MAX_IMAGE_PIXELS = 2**27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # these rotate by 90 degrees: height and width swap
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class CropPlan:
    original_size: tuple[int, int]  # (h, w) of the file as decoded (EXIF orientation applied)
    resized_size: tuple[int, int]  # (h, w) after scaling the image to cover target_size
    crop_top_left: tuple[int, int]  # (top, left) in resized coordinates
    target_size: tuple[int, int]  # (h, w) of the bucket the image is trained at

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's `add_time_ids`: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def plan_crop(
    original_size: tuple[int, int], target: int | tuple[int, int], crop_style: str, seed: int, image_key: str
) -> CropPlan:
    """Where a crop of size `target` ((h, w), or an int for a square) of an image of `original_size` comes from.

    The image is scaled by max(target_h / h, target_w / w) so it covers the target; each resized edge
    rounds to the nearest pixel and is never below the target's. `center` puts the crop at
    `(extra // 2)` on each axis, `corner` at (0, 0), `random` at offsets drawn from a SHA-256 of
    (seed, image_key): deterministic, independent of any global RNG and of call order.
    """
    height, width = (int(v) for v in original_size)
    target_h, target_w = (int(target), int(target)) if isinstance(target, int) else (int(v) for v in target)
    if height <= 0 or width <= 0:
        raise ValueError(f"original_size must be positive, got {original_size}")
    if target_h <= 0 or target_w <= 0:
        raise ValueError(f"target size must be positive, got {target}")
    scale = max(target_h / height, target_w / width)
    resized = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
    extra_h, extra_w = resized[0] - target_h, resized[1] - target_w
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
        target_size=(target_h, target_w),
    )


def mirror_plan(plan: CropPlan) -> CropPlan:
    """The plan of the same crop taken from the horizontally mirrored image: the crop's left edge becomes
    resized_width - crop_left - target_width (SDXL's crop coordinates of a flipped sample), the rest unchanged."""
    top, left = plan.crop_top_left
    return dataclasses.replace(plan, crop_top_left=(top, plan.resized_size[1] - left - plan.target_size[1]))


def flip_chosen(seed: int, epoch: int, index: int) -> bool:
    """Whether the item at `index` trains flipped in `epoch` (flip_images): a fair coin from a SHA-256 of
    (seed, epoch, index) alone, so it is the same on every process and after a resume."""
    digest = hashlib.sha256(json.dumps(["flip", int(seed), int(epoch), int(index)]).encode("utf-8")).digest()
    return bool(digest[0] & 1)


def _failure(path: os.PathLike | str, exc: BaseException) -> DataError:
    detail = str(exc) or "no detail"
    return DataError(f"{path}: cannot read the image ({type(exc).__name__}: {detail}). Replace or remove the file.")


_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def _open_checked(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Image.open (header only) that refuses empty files and images over `max_pixels`."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Replace or remove the file.")
    guard = ("(expertune.data.transforms.MAX_IMAGE_PIXELS, a guard against decompression bombs). "
             "Downscale the image or remove it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            image = Image.open(path)
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise DataError(f"{path}: {exc} It is over the limit of {max_pixels:,} pixels {guard}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(
            f"{path}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} {guard}"
        )
    return image


def image_size(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(h, w) of the image as `load_image` will return it, reading only the header and EXIF.

    Raises DataError naming the file when it is empty, not an image, or over `max_pixels`.
    """
    try:
        with _open_checked(path, max_pixels) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except _READ_ERRORS as exc:
        raise _failure(path, exc) from exc
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


SIXTEEN_BIT_BAND_PIXELS = 1 << 20  # 16-bit pixels scaled a band of rows at a time: about 6 MiB at most


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Grey 16-bit (or 32-bit integer) pixels scaled to 8 bits; PIL's own convert clips them to white.

    In integers, a band of rows at a time: `(v + 128) // 257` is `rint(v / 257)` for every integer v (no ties), so
    the pixels equal the float formula's while the memory beyond the decoded image is its 8-bit copy and one band
    (never a float64 copy of the whole image: 1 GiB at MAX_IMAGE_PIXELS)."""
    low, high = image.getextrema()
    scale = image.mode != "I" or high > 255  # "I" holding 8-bit values is left as it is
    width, height = image.size
    grey = np.empty((height, width), dtype=np.uint8)
    rows = max(1, SIXTEEN_BIT_BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows)))).astype(np.int32)
        if scale:
            np.clip(band, 0, 65535, out=band)
            band += 128
            band //= 257
        np.clip(band, 0, 255, out=band)
        grey[top:top + band.shape[0]] = band
    return Image.fromarray(grey, "L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the file's ICC profile when it has one (what viewers show), else PIL's plain formula."""
    profile = image.info.get("icc_profile")
    if profile and ImageCms is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (OSError, ValueError, ImageCms.PyCMSError):  # a broken profile: plain formula
            pass
    return image.convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB", "LA", "PA"):
        image = image.convert("RGBA")  # palette / colour-key transparency becomes an alpha channel
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The decoded image as 8-bit RGB with its EXIF orientation applied.

    Transparent pixels are composited onto white (their hidden colour is often black noise); 16-bit
    images are scaled to 8 bits; CMYK goes through its ICC profile. Raises DataError naming the file
    when it is empty, truncated, not an image, or over `max_pixels`.
    """
    try:
        with _open_checked(path, max_pixels) as opened:
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except _READ_ERRORS as exc:
        raise _failure(path, exc) from exc


def image_to_tensor(image: Image.Image, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """Resize and crop `image` by `plan`: float32 [3, H, W] in [-1, 1]. With `flip`, the resized image is mirrored
    before the crop, so a `mirror_plan` gives the mirror image of the unflipped plan's crop."""
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
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cropped = rgb.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
