"""A cold start against a warm restart with the persistent file index, local and in a bucket.

Writes `--images` small captioned PNGs (noise, `--size` px, captions in `.txt` files), then measures two
things, each cold (an empty cache directory: no file index, no fetched objects, no cache entries) and warm
(the same again, as a restart does):

- **start** (`--measure start`): `prepare_data`, everything `expertune train` and `cache` do before the first
  step — discovery, then every latent and text embedding encoded (cold) or found in the caches (warm) —
  with the shipped world model's VAE and text encoders (the embedded default, `expertune.world.PRETRAINED`).
  The issue's ratio: a restart's start against a first start.
- **discovery** (`--measure discovery`): its first part alone, `prepare._plan_images`: find every image and
  its caption (a directory walk, or a listing of the bucket), then each image's SHA-256 and header (fetching
  the object first for a bucket) and its crop plan and cache key. Warm, the index knows every file
  unchanged, so no image or caption byte is read (for the bucket, no object is fetched: one listing only).

The bucket is moto's S3-compatible server, started here on loopback in its own process (its
per-request cost is not a real bucket's: the cold bucket figure measures this machine, not S3).
Prints one JSON line per backend and measure: cold and warm seconds, `warm_vs_cold` (target <= 0.02) and
seconds per 10,000 images of each; for discovery in a local folder also `stat_walk_s`, a bare listing and
`stat` of every file (images and captions), and for a bucket (both measures) `listing_s`, one bare listing of
the prefix — the least any restart that notices an edited file can do.

    python bench/discovery_index.py                      # 20,000 images, local and bucket, start and discovery
    python bench/discovery_index.py --measure discovery --backends local
    python bench/discovery_index.py --images 2000 --backends local
    python bench/discovery_index.py --images 2000 --size 1024 --format jpg --backends local   # photo-sized files
    sudo python bench/discovery_index.py --backends local --drop-caches   # both passes read from the disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def emit(**figures) -> None:
    print(json.dumps(figures), flush=True)


def write_images(folder: Path, count: int, size: int, extension: str) -> int:
    """`count` captioned noise images in folders of 1,000; their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for index in range(count):
        sub = folder / f"part_{index // 1000:03d}"
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = sub / f"img_{index:06d}.{extension}"
        if extension == "png":
            Image.fromarray(pixels).save(path, compress_level=1)
        else:
            Image.fromarray(pixels).save(path, quality=90)
        (sub / f"img_{index:06d}.txt").write_text(f"noise picture number {index}\n")
        total += path.stat().st_size
    return total


def stat_walk_seconds(folder: Path) -> float:
    """The floor of any restart that notices a changed file: list every folder and stat every file, nothing else."""
    start = time.perf_counter()
    pending = [str(folder)]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                if entry.is_dir():
                    pending.append(entry.path)
                else:
                    entry.stat()
    return time.perf_counter() - start


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("moto server did not start")


def upload(endpoint: str, bucket: str, folder: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=p.relative_to(folder).as_posix(),
                                                  Body=p.read_bytes()), files))


def drop_page_cache(enabled: bool) -> None:
    """Write back and drop the kernel's page, dentry and inode caches (Linux, root)."""
    if not enabled:
        return
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({error}); run as root or without it")


def time_discovery(loader: Path, cache: Path, vae) -> tuple[float, int, int]:
    """(seconds, images planned, images skipped) of steps 1-2 of `prepare_data` over `loader`."""
    from expertune.cache.latents import LatentCache
    from expertune.data.dataloader import load_dataloader_config
    from expertune.data.file_index import INDEX_NAME, FileIndex
    from expertune.prepare import _plan_images, _Skips

    start = time.perf_counter()
    dataloader = load_dataloader_config(loader, default_resolution=64, default_cache_dir=cache)
    index = FileIndex(cache / INDEX_NAME)
    latent_cache = LatentCache(vae, seed=0, batch_size=8, index=index)
    skips = _Skips()
    _, planned = _plan_images(dataloader, latent_cache, skips, progress=False)
    index.flush()
    return time.perf_counter() - start, len(planned), len(skips.entries)


def time_start(loader: Path, cache: Path, components) -> tuple[float, dict]:
    """(seconds, cache counts) of `prepare_data` over `loader`: a run's whole start before its first step."""
    from expertune.config import load_config
    from expertune.prepare import prepare_data
    from expertune.world import PRETRAINED

    config, _ = load_config([f"--pretrained_model_name_or_path={PRETRAINED / 'base'}",
                             f"--data_backend_config={loader}", f"--cache_dir={cache}"])
    start = time.perf_counter()
    prepared = prepare_data(config, components, progress=False)
    return time.perf_counter() - start, dict(prepared.cache_stats)


def listing_seconds(loader: Path, cache: Path) -> float:
    """The floor of any restart that notices a changed object: one paginated listing of the prefix, nothing else."""
    from expertune.data.dataloader import load_dataloader_config
    from expertune.data.remote import S3Dataset

    spec = load_dataloader_config(loader, default_resolution=64, default_cache_dir=cache).datasets[0]
    start = time.perf_counter()
    sum(1 for _ in S3Dataset(spec).list_objects())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64, help="edge of each square image, in pixels")
    parser.add_argument("--format", dest="extension", choices=("png", "jpg"), default="png",
                        help="png (fast to hash: the issue's small images) or jpg (quality 90: a photo-sized file "
                        "with --size 1024)")
    parser.add_argument("--backends", default="local,bucket")
    parser.add_argument("--measure", default="start,discovery",
                        help="start (prepare_data, with the world model), discovery (its first part), or both")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--drop-caches", dest="drop_caches", action="store_true",
                        help="empty the OS page cache before each timed pass (needs root), so both read from the "
                        "disk as a first start on a node, or a dataset larger than memory, does")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from expertune.models.tiny import tiny_vae_config

    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config()).eval()  # discovery: only its fingerprint is used, nothing is encoded
    measures = args.measure.split(",")
    if "start" in measures:
        from expertune.models.sdxl import load_components
        from expertune.world import PRETRAINED

        components = load_components(str(PRETRAINED / "base"), with_unet=False)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="expertune-discovery-"))
    images = work / "images"
    started = time.perf_counter()
    total_bytes = write_images(images, args.images, args.size, args.extension)
    emit(stage="wrote images", images=args.images, size=args.size, format=args.extension,
         mean_kib=round(total_bytes / args.images / 1024, 1), seconds=round(time.perf_counter() - started, 1))

    moto = None
    try:
        for backend in args.backends.split(","):
            entry = {"id": "bench", "caption_strategy": "textfile", "resolution": 64}
            if backend == "local":
                entry.update(type="local", instance_data_dir=str(images))
            else:
                moto, endpoint = start_moto(work / "moto.log")
                os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                started = time.perf_counter()
                upload(endpoint, "bench", images)
                emit(stage="uploaded", objects=2 * args.images, seconds=round(time.perf_counter() - started, 1))
                entry.update(type="aws", aws_bucket_name="bench", aws_endpoint_url=endpoint,
                             aws_region_name="us-east-1")
            for measure in measures:
                cache = work / f"cache-{backend}-{measure}"
                shutil.rmtree(cache, ignore_errors=True)
                loader = work / f"{backend}-{measure}.json"
                loader.write_text(json.dumps([{**entry, "cache_dir_vae": str(cache / "latents")},
                                              {"id": "te", "dataset_type": "text_embeds", "default": True,
                                               "cache_dir": str(cache / "text")}]))
                figures: dict = {}
                if measure == "start":
                    drop_page_cache(args.drop_caches)
                    cold, cold_stats = time_start(loader, cache, components)
                    drop_page_cache(args.drop_caches)
                    warm, warm_stats = time_start(loader, cache, components)
                    assert cold_stats["latents_encoded"] == args.images and warm_stats["latents_encoded"] == 0, \
                        (cold_stats, warm_stats)
                    assert warm_stats["embeds_encoded"] == 0, warm_stats
                    figures = {"cold_stats": cold_stats, "warm_stats": warm_stats}
                    if backend == "bucket":  # the floor of a restart that notices a changed object: one listing
                        floor = listing_seconds(loader, cache)
                        figures.update(listing_s=round(floor, 3), listing_vs_cold=round(floor / cold, 4))
                else:
                    drop_page_cache(args.drop_caches)
                    cold, planned, skipped = time_discovery(loader, cache, vae)
                    drop_page_cache(args.drop_caches)
                    warm, planned_again, _ = time_discovery(loader, cache, vae)
                    assert planned == planned_again == args.images and skipped == 0, (planned, planned_again, skipped)
                    if backend == "local":
                        drop_page_cache(args.drop_caches)
                        floor = stat_walk_seconds(images)
                        figures = {"stat_walk_s": round(floor, 3), "stat_walk_vs_cold": round(floor / cold, 4)}
                    else:
                        floor = listing_seconds(loader, cache)
                        figures = {"listing_s": round(floor, 3), "listing_vs_cold": round(floor / cold, 4)}
                emit(backend=backend, measure=measure, images=args.images, cold_s=round(cold, 3),
                     warm_s=round(warm, 3), warm_vs_cold=round(warm / cold, 4),
                     cold_s_per_10k=round(cold * 10_000 / args.images, 3),
                     warm_s_per_10k=round(warm * 10_000 / args.images, 3), **figures,
                     page_cache_dropped=args.drop_caches)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
