"""Captioned images on disk as a user's dataset, and the dataloader JSON that names them.

Images are written with sibling .txt captions (caption_strategy=textfile), the layout a user's own dataset
has; `draw_shape` makes small offline test images (tests and benchmarks). The demo's own images are the
world's (`expertune.world.dataset`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from expertune.io_utils import atomic_write_bytes, atomic_write_json

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = (
    ("circle", "red", "blue"),
    ("square", "yellow", "black"),
    ("triangle", "green", "white"),
    ("circle", "white", "green"),
    ("square", "blue", "yellow"),
    ("triangle", "red", "black"),
    ("circle", "yellow", "red"),
    ("square", "green", "blue"),
)


def draw_shape(shape: str, colour: str, background: str, size: int = 192) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    margin = size // 5
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)],
                     fill=COLOURS[colour])
    return image


def save_captioned_image(image: Image.Image, path: Path, caption: str) -> None:
    buffer = io.BytesIO()
    if path.suffix == ".jpg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(path.with_suffix(".txt"), (caption + "\n").encode("utf-8"))


def write_dataloader_config(path: str | os.PathLike, images: Path, cache_dir: Path, resolution: int) -> Path:
    """A SimpleTuner-style dataloader JSON for the demo: one local dataset and a text-embeds cache."""
    entries = [
        {
            "id": "demo-images",
            "type": "local",
            "instance_data_dir": str(images),
            "caption_strategy": "textfile",
            "resolution": resolution,
            "resolution_type": "pixel",
            "crop": True,
            "crop_style": "center",
            "cache_dir_vae": str(cache_dir / "latents"),
        },
        {
            "id": "demo-text-embeds",
            "dataset_type": "text_embeds",
            "default": True,
            "type": "local",
            "cache_dir": str(cache_dir / "text_embeds"),
        },
    ]
    atomic_write_json(path, entries)
    return Path(path)


