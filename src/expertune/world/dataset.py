"""World scenes on disk as a user's dataset: PNG images with sibling .txt captions."""

from __future__ import annotations

import os
from pathlib import Path

from expertune.data.captioned import save_captioned_image
from expertune.world.scene import Scene, render


def write_world_dataset(directory: str | os.PathLike, drawn: list[Scene], size: int = 64) -> Path:
    """Write `drawn` as `directory/images/world_NNNNN.png` + `.txt`; returns the images folder."""
    images = Path(directory) / "images"
    for index, scene in enumerate(drawn):
        save_captioned_image(render(scene, size), images / f"world_{index:05d}.png", scene.caption)
    return images
