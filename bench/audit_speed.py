"""`expertune audit` speed: images per second over a generated local dataset.

Writes `--images` captioned photos-like JPEGs (smooth colour fields with noise, `--size` px, qualities
spread from 40 to 95, a few near-duplicates and small images among them), then times
`audit_dataset` — the code `expertune audit` runs: discovery, one decode per image (JPEGs in draft
mode), quality estimate, difference hash, the duplicate search and the caption checks.

    python bench/audit_speed.py                     # 2,000 images of 512 px
    python bench/audit_speed.py --images 500 --size 1024
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        field = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, size=(size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if index % 50 == 7:
            image = image.resize((size // 4, size // 4))  # small
        image.save(folder / f"img_{index:06d}.jpg", quality=int(40 + (index * 7) % 56))
        if index % 100 == 3:
            image.resize((size - 16, size - 16)).save(folder / f"img_{index:06d}_copy.jpg", quality=90)
            (folder / f"img_{index:06d}_copy.txt").write_text(f"a copy of picture {index}\n")
        (folder / f"img_{index:06d}.txt").write_text(f"picture number {index}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    from expertune.data.audit import AuditSettings, audit_dataset
    from expertune.data.dataloader import load_dataloader_config

    work = Path(tempfile.mkdtemp(prefix="expertune-audit-"))
    try:
        write_images(work / "images", args.images, args.size)
        loader = work / "loader.json"
        loader.write_text(json.dumps([{"id": "bench", "instance_data_dir": str(work / "images"),
                                       "caption_strategy": "textfile", "resolution": args.size // 2}]))
        spec = load_dataloader_config(loader, default_resolution=args.size // 2, default_cache_dir=work).datasets[0]
        settings = AuditSettings()
        start = time.perf_counter()
        report = audit_dataset(spec, settings)
        seconds = time.perf_counter() - start
        print(json.dumps({"images": report.images, "size": args.size, "workers": settings.workers,
                          "seconds": round(seconds, 2), "images_per_second": round(report.images / seconds, 1),
                          "counts": report.counts()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
