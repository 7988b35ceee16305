"""The VAE latent cache: one entry per (image bytes, crop, VAE weights, VAE dtype).

A latent is `vae.encode(x).latent_dist.mean * vae.config.scaling_factor`: the distribution's mean,
not a sample, so an entry is a pure function of its key and two jobs sharing the cache agree
bit for bit. (Sampling at train time would need the cached std as well; not done.) The crop that
produced the latent is stored with it as SDXL time ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from expertune.cache.store import CacheStats, CacheStore, cache_key, file_digest, module_fingerprint
from expertune.data.records import DatasetSpec, ImageRecord
from expertune.data.transforms import RESAMPLE_NAME, CropPlan, image_size, image_to_tensor, load_image, plan_crop
from expertune.errors import DataError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

LATENT_KIND = "vae_latent"
LATENT_STATISTIC = "mean"


@dataclass(frozen=True)
class _Planned:
    key: str
    digest: str
    plan: CropPlan


class LatentCache:
    """Encodes images into per-dataset stores (`spec.cache_dir_vae`) and reads them back."""

    def __init__(self, vae: AutoencoderKL, *, seed: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vae = vae
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.dtype = next(vae.parameters()).dtype
        self.fingerprint = module_fingerprint(vae)
        self._stores: dict[Path, CacheStore] = {}
        self._digests: dict[tuple[Path, int, int], tuple[str, tuple[int, int]]] = {}

    def store_for(self, spec: DatasetSpec) -> CacheStore:
        root = Path(spec.cache_dir_vae)
        if root not in self._stores:
            self._stores[root] = CacheStore(root)
        return self._stores[root]

    def _planned(self, record: ImageRecord, spec: DatasetSpec) -> _Planned:
        path = Path(record.path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise DataError(
                f"{path}: cannot read the image ({exc.strerror or exc}). Replace or remove the file."
            ) from exc
        # Memo per (path, size, mtime): one run hashes each file once, an edited file is hashed again.
        memo_key = (path, stat.st_size, stat.st_mtime_ns)
        if memo_key not in self._digests:
            self._digests[memo_key] = (file_digest(path), image_size(path))
        digest, original_size = self._digests[memo_key]
        # The random crop is drawn from the image *content*, so moving a dataset keeps its crops and cache.
        plan = plan_crop(original_size, spec.resolution, spec.crop_style, self.seed, image_key=digest)
        parts = {
            "image_sha256": digest,
            "resolution": spec.resolution,
            "crop_style": spec.crop_style,
            "original_size": plan.original_size,
            "resized_size": plan.resized_size,
            "crop_top_left": plan.crop_top_left,
            "target_size": plan.target_size,
            "resample": RESAMPLE_NAME,
            "vae": self.fingerprint,
            "vae_dtype": str(self.dtype),
            "statistic": LATENT_STATISTIC,
        }
        return _Planned(key=cache_key(LATENT_KIND, parts), digest=digest, plan=plan)

    def key_for(self, record: ImageRecord, spec: DatasetSpec) -> str:
        return self._planned(record, spec).key

    def ensure(self, items: Sequence[tuple[ImageRecord, DatasetSpec]]) -> CacheStats:
        """Encode every entry missing from its dataset's store; counts are over distinct entries."""
        missing: dict[str, tuple[ImageRecord, _Planned, list[CacheStore]]] = {}
        seen: set[tuple[Path, str]] = set()
        reused = 0
        for record, spec in items:
            planned = self._planned(record, spec)
            store = self.store_for(spec)
            if (store.root, planned.key) in seen:
                continue
            seen.add((store.root, planned.key))
            if store.contains(planned.key):
                reused += 1
            elif planned.key in missing:
                missing[planned.key][2].append(store)
            else:
                missing[planned.key] = (record, planned, [store])

        # Same target size in one batch; a fixed order so batches (and their numerics) are reproducible.
        order = sorted(missing.values(), key=lambda item: (item[1].plan.target_size, str(item[0].path)))
        written = 0
        if order:
            with tqdm(total=len(order), desc="caching latents", unit="img") as progress:
                start = 0
                while start < len(order):
                    size = order[start][1].plan.target_size
                    stop = start
                    while (
                        stop < len(order)
                        and stop - start < self.batch_size
                        and order[stop][1].plan.target_size == size
                    ):
                        stop += 1
                    written += self._encode_batch(order[start:stop])
                    progress.update(stop - start)
                    start = stop
        return CacheStats(encoded=written, reused=reused)

    def _encode_batch(self, batch: Sequence[tuple[ImageRecord, _Planned, list[CacheStore]]]) -> int:
        pixels = torch.stack([image_to_tensor(load_image(record.path), planned.plan) for record, planned, _ in batch])
        device = next(self.vae.parameters()).device
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(device=device, dtype=self.dtype)).latent_dist
            latents = posterior.mean * self.vae.config.scaling_factor
        written = 0
        for (record, planned, stores), latent in zip(batch, latents):
            time_ids = torch.tensor(planned.plan.time_ids(), dtype=torch.int64)
            metadata = {
                "source": os.fspath(record.path),
                "image_sha256": planned.digest,
                "time_ids": ",".join(str(v) for v in planned.plan.time_ids()),
                "resized_size": ",".join(str(v) for v in planned.plan.resized_size),
                "vae_fingerprint": self.fingerprint,
                "vae_dtype": str(self.dtype),
                "statistic": LATENT_STATISTIC,
            }
            for store in stores:
                store.put(planned.key, {"latent": latent, "time_ids": time_ids}, metadata)
                written += 1
        return written

    def load(self, record: ImageRecord, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [4, h, w] float32, already scaled; time_ids [6] float32) of a cached image."""
        planned = self._planned(record, spec)
        store = self.store_for(spec)
        entry = store.get(planned.key)
        tensors = entry[0] if entry is not None else {}
        latent, time_ids = tensors.get("latent"), tensors.get("time_ids")
        if latent is None or time_ids is None or latent.ndim != 3 or tuple(time_ids.shape) != (6,):
            raise DataError(
                f"{record.path}: no usable cached latent in {store.root} (key {planned.key}). "
                "Run the latent caching step (LatentCache.ensure) for this dataset first."
            )
        return latent.to(torch.float32), time_ids.to(torch.float32)
