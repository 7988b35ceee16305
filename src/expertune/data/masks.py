"""Loss masks: which pixels of a training image the loss counts (SimpleTuner's `conditioning_type: mask` datasets,
kohya's `alpha_mask`).

A mask is a grey image of the same size as its training image (white: train, black: ignore, grey: in between), or
the image's own alpha channel. It is resized and cropped with the image's own `CropPlan` (so it covers the same
pixels as the latent), mirrored with it for a flipped sample, and averaged over each 8 × 8 block into the latent's
grid: a [1, H / 8, W / 8] tensor in [0, 1] that multiplies the loss of each latent element.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from expertune.data.transforms import RESAMPLE, CropPlan, _open_checked, MAX_IMAGE_PIXELS
from expertune.errors import DataError

LATENT_FACTOR = 8  # the SDXL VAE's downsampling
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def mask_file_for(image: Path, image_root: Path, mask_root: Path) -> Path | None:
    """The mask of `image` in `mask_root`: the same relative path, or the same name with another image suffix."""
    try:
        relative = image.relative_to(image_root)
    except ValueError:
        relative = Path(image.name)
    candidate = mask_root / relative
    if candidate.is_file():
        return candidate
    for suffix in MASK_SUFFIXES:
        other = candidate.with_suffix(suffix)
        if other.is_file():
            return other
    return None


def read_mask(path: str | os.PathLike, *, alpha: bool = False) -> Image.Image:
    """The mask as an 8-bit grey ("L") image with the EXIF orientation applied: the grey levels of a mask file, or
    the alpha channel of an image (`alpha`; an image without one masks nothing: all white)."""
    try:
        with _open_checked(path, MAX_IMAGE_PIXELS) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if not alpha:
                return image.convert("L")
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                return image.convert("RGBA").getchannel("A")
            return Image.new("L", image.size, 255)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DataError(f"{path}: cannot read the mask ({type(error).__name__}: {error})") from error


def mask_to_latent_grid(mask: Image.Image, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """[1, target_h / 8, target_w / 8] float32 in [0, 1]: the mask resized and cropped by `plan` (as the image is),
    mirrored with `flip`, averaged over each 8 × 8 block. DataError when its size is not the image's."""
    expected = (plan.original_size[1], plan.original_size[0])
    if mask.size != expected:
        raise DataError(f"the mask is {mask.size[0]}x{mask.size[1]} (w x h), its image {expected[0]}x{expected[1]}: "
                        "give a mask of the image's own size")
    resized_h, resized_w = plan.resized_size
    top, left = plan.crop_top_left
    target_h, target_w = plan.target_size
    grey = mask.convert("L")
    if grey.size != (resized_w, resized_h):
        grey = grey.resize((resized_w, resized_h), resample=RESAMPLE)
    cropped = grey.crop((left, top, left + target_w, top + target_h))
    array = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None, None]
    grid = torch.nn.functional.avg_pool2d(array, LATENT_FACTOR)[0].clamp_(0.0, 1.0)
    return grid.flip(-1) if flip else grid


def masked_mean(elementwise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each sample's mean loss with every latent element weighted by its mask ([B, 1, h, w], broadcast over the
    channels): mean(loss · mask), as kohya and SimpleTuner do (not divided by the mask's area, so a small subject
    trains with a small step, and an all-black mask gives 0)."""
    return (elementwise * masks.to(elementwise.device, elementwise.dtype)).flatten(1).mean(dim=1)
