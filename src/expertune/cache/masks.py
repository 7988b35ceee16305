"""The loss-mask cache: each image's mask on the latent grid (data/masks.py), content-addressed like the latents.

An entry's key covers the mask's content (the mask file's SHA-256, or the image's for an alpha mask), the crop plan
of the latent it goes with and how it is computed, so two jobs (or datasets) that crop an image the same way share
it; it lives in the dataset's latent store. A flipped sample's mask is the entry mirrored (`load(flipped=True)`).
An image whose mask is missing, unreadable or of another size is returned as a failure: `prepare` skips and lists
it, and it is never trained with a wrong mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from expertune.cache.latents import LatentCache
from expertune.cache.store import cache_key, file_digest
from expertune.data.dataloader import DatasetSpec
from expertune.data.masks import LATENT_FACTOR, mask_file_for, mask_to_latent_grid, read_mask
from expertune.data.records import ImageRecord
from expertune.data.transforms import RESAMPLE_NAME
from expertune.errors import DataError

MASK_KIND = "loss_mask"
MASK_VERSION = "area8-v1"  # part of the key: bump it when `mask_to_latent_grid` changes


class MaskCache:
    """Masks of the datasets that have them (`DatasetSpec.has_masks`), beside their latents."""

    def __init__(self, latents: LatentCache) -> None:
        self.latents = latents
        self._keys: dict[tuple[str, Path], str] = {}
        self.encoded = 0
        self.reused = 0

    def source(self, record: ImageRecord, spec: DatasetSpec) -> Path:
        """The file the mask is read from (the image itself for an alpha mask); DataError when it has none."""
        if spec.alpha_mask:
            return Path(record.path)
        assert spec.mask_dir is not None
        found = mask_file_for(Path(record.path), spec.instance_data_dir, spec.mask_dir)
        if found is None:
            raise DataError(f"no mask for {record.path} in {spec.mask_dir} (the same relative path and name, any "
                            "image suffix): add one, or remove the image")
        return found

    def key(self, record: ImageRecord, spec: DatasetSpec) -> str:
        memo = self._keys.get((spec.id, Path(record.path)))
        if memo is not None:
            return memo
        planned = self.latents.planned(record, spec)
        plan = planned.plan
        parts = {"mask_sha256": file_digest(self.source(record, spec)), "alpha": spec.alpha_mask,
                 "image_sha256": planned.digest, "original_size": plan.original_size,
                 "resized_size": plan.resized_size, "crop_top_left": plan.crop_top_left,
                 "target_size": plan.target_size, "resample": RESAMPLE_NAME, "version": MASK_VERSION}
        key = self._keys[(spec.id, Path(record.path))] = cache_key(MASK_KIND, parts)
        return key

    def ensure(self, items: Sequence[tuple[ImageRecord, DatasetSpec]]) -> dict[str, str]:
        """Compute every missing mask entry; returns {image path: why it cannot be trained} for the failures."""
        failed: dict[str, str] = {}
        for record, spec in items:
            if not spec.has_masks:
                continue
            try:
                key = self.key(record, spec)
                store = self.latents.store_for(spec)
                if store.contains(key):
                    self.reused += 1
                    continue
                plan = self.latents.planned(record, spec).plan
                grid = mask_to_latent_grid(read_mask(self.source(record, spec), alpha=spec.alpha_mask), plan)
                store.put(key, {"mask": grid}, {"source": os.fspath(self.source(record, spec)),
                                                "alpha": str(spec.alpha_mask).lower(), "version": MASK_VERSION})
                self.encoded += 1
            except DataError as error:
                failed[str(record.path)] = str(error)
        return failed

    def load(self, record: ImageRecord, spec: DatasetSpec, flipped: bool = False) -> torch.Tensor:
        """[1, h, w] mask of a cached image (mirrored for a flipped sample); all ones for a dataset without masks."""
        planned = self.latents.planned(record, spec)
        if not spec.has_masks:
            h, w = planned.plan.target_size
            return torch.ones(1, h // LATENT_FACTOR, w // LATENT_FACTOR)
        entry = self.latents.store_for(spec).get(self.key(record, spec))
        mask = None if entry is None else entry[0].get("mask")
        if mask is None:
            raise DataError(f"{record.path}: no cached loss mask; run the caching step first")
        return mask.flip(-1) if flipped else mask
