"""The demo dataset: public-domain/CC0 photographs shipped inside scikit-image, plus drawn shapes.

Everything is generated offline and deterministically; captions are written as sibling .txt files
(caption_strategy=textfile), the layout a user's own dataset has.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from expertune.io_utils import atomic_write_bytes, atomic_write_json

# (skimage.data loader, caption). Licences per each loader's docstring: public domain or CC0.
PHOTOGRAPHS = (
    ("astronaut", "a photograph of an astronaut in a white spacesuit in front of a flag"),
    ("chelsea", "a photograph of a tabby cat with green eyes"),
    ("coffee", "a photograph of a cup of coffee on a saucer, seen from above"),
    ("rocket", "a photograph of a rocket on its launch pad under a blue sky"),
    ("hubble_deep_field", "a telescope photograph of many distant galaxies on a black sky"),
    ("retina", "a medical photograph of a human retina, orange with red blood vessels"),
    ("brick", "a grey photograph of a brick wall texture"),
    ("grass", "a grey photograph of a grass texture"),
)

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
MAX_SIDE = 256


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


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


def write_demo_dataset(directory: str | os.PathLike) -> Path:
    """Write the images with .txt captions into `directory/images`; returns that folder."""
    images = Path(directory) / "images"
    for index, (name, caption) in enumerate(PHOTOGRAPHS):
        save_captioned_image(_photo(name), images / f"photo_{index:02d}_{name}.jpg", caption)
    for index, (shape, colour, background) in enumerate(SHAPES):
        caption = f"a {colour} {shape} on a {background} background"
        save_captioned_image(draw_shape(shape, colour, background), images / f"shape_{index:02d}.png", caption)
    return images


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


