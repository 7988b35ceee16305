"""The VAE latent cache: one entry per (image bytes, crop plan, VAE weights, VAE dtype).

A latent is `vae.encode(x).latent_dist.mean * vae.config.scaling_factor`: the distribution's mean,
not a sample, so an entry is a pure function of its key and two jobs sharing the cache agree
bit for bit. (Sampling at train time would need the cached std as well; not done.) The crop that
produced the latent is stored with it as SDXL time ids. Which size and crop an image gets is its
dataset's `BucketRule`; the key covers the resulting plan, not the settings that led to it, so two
datasets (or jobs) that crop an image the same way share its entry.

The key covers the VAE by its content (`module_fingerprint`: class, config, weights), not by the model it
came from, so two models with the same VAE — SDXL base and its refiner, or an SSD-1B base — share every
latent; `check_shared_vae` is the one refusal of models whose VAEs differ where one cache must serve both.
Entries hold SDXL base's six time ids; a `TimeIdLayout` turns them into what a refiner-layout UNet takes at
`load`, so the entry itself does not depend on the layout.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from expertune.models.sdxl import encode_latents
from expertune.cache.store import (
    CacheStats,
    CacheStore,
    Encoded,
    Pending,
    cache_key,
    file_digest,
    fill_entries,
    module_fingerprint,
)
from expertune.data.batches import TimeIdLayout
from expertune.data.buckets import BucketRule
from expertune.data.dataloader import DatasetSpec
from expertune.data.file_index import FileIndex, FileStamp, FolderEntries, local_stamp
from expertune.data.records import ImageRecord
from expertune.data.transforms import (
    DECODE_VERSION,
    MAX_IMAGE_PIXELS,
    RESAMPLE_NAME,
    CropPlan,
    flip_chosen,
    image_size,
    image_to_tensor,
    load_image,
    mirror_plan,
)
from expertune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from expertune.models.sdxl import SDXLComponents

LATENT_KIND = "vae_latent"
LATENT_STATISTIC = "mean"
IMAGE_KIND = "image"  # FileIndex kind: {"sha256": ..., "h": ..., "w": ...}
# FileIndex kind prefix of a remembered plan ("latent_plan:<settings digest>"): key, hash and CropPlan fields
PLAN_KIND = "latent_plan"


@dataclass(frozen=True)
class ImageInfo:
    """What the cache knows of an image file without decoding it: its content hash and its size."""

    digest: str  # SHA-256 of the file's bytes
    original_size: tuple[int, int]  # (h, w) as decoded, EXIF orientation applied


@dataclass(frozen=True)
class LatentPlan:
    """An image's cache key, content hash and crop plan (its bucket is `plan.target_size`)."""

    key: str
    digest: str
    plan: CropPlan
    flipped: bool = False  # the entry of the mirrored image (flip_images): `plan` is then its mirror_plan


def _plan_fields(planned: LatentPlan) -> list[Any]:
    """A plan as the flat list the whole-folder index entries keep: key, hash, then the CropPlan's four sizes."""
    plan = planned.plan
    return [planned.key, planned.digest, *plan.original_size, *plan.resized_size, *plan.crop_top_left,
            *plan.target_size]


def _plan_from_fields(fields: list[Any]) -> LatentPlan:
    """The inverse of `_plan_fields`; ValueError for a list of another shape (another build's entry)."""
    key, digest, o0, o1, r0, r1, c0, c1, t0, t1 = fields  # ValueError unless ten
    if type(key) is not str or type(digest) is not str or set(map(type, fields[2:])) != {int}:
        raise ValueError(f"a remembered plan is two strings and eight integers, not {fields!r}")
    return LatentPlan(key=key, digest=digest, plan=CropPlan(
        original_size=(o0, o1), resized_size=(r0, r1), crop_top_left=(c0, c1), target_size=(t0, t1)))


class LatentCache:
    """Encodes images into per-dataset stores (`spec.cache_dir_vae`) and reads them back."""

    def __init__(
        self, vae: AutoencoderKL, *, seed: int, batch_size: int, max_pixels: int = MAX_IMAGE_PIXELS,
        time_ids: TimeIdLayout = TimeIdLayout(),
        index: FileIndex | None = None, flip: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vae = vae
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.max_pixels = int(max_pixels)
        self.time_ids = time_ids  # what `load` returns: SDXL's six time ids, or the refiner's five
        self.dtype = next(vae.parameters()).dtype
        self.fingerprint = module_fingerprint(vae)
        self._stores: dict[Path, CacheStore] = {}
        self._plan_kinds: dict[BucketRule, str] = {}
        self._plans: dict[tuple[str, FileStamp], LatentPlan] = {}  # this process's plans: (plan kind, stamp) -> plan
        # What a latent's key covers besides the image and its crop: the same for every image of this cache.
        self._key_settings = {"decode": DECODE_VERSION, "resample": RESAMPLE_NAME, "flip": False,
                              "vae": self.fingerprint, "vae_dtype": str(self.dtype), "statistic": LATENT_STATISTIC}
        self.index = index if index is not None else FileIndex(None)
        self.flip = bool(flip)  # flip_images: every image is also cached mirrored, as its own entry

    def with_time_ids(self, time_ids: TimeIdLayout) -> LatentCache:
        """The same cache (stores, VAE, memoised image hashes) whose `load` gives `time_ids`' layout."""
        view = copy.copy(self)
        view.time_ids = time_ids
        return view

    def store_for(self, spec: DatasetSpec) -> CacheStore:
        store = self._stores.get(spec.cache_dir_vae)  # asked for every image: no new Path each time
        if store is None:
            store = self._stores[spec.cache_dir_vae] = CacheStore(spec.cache_dir_vae)
        return store

    def known(self, record: ImageRecord) -> bool:
        """Whether `record`'s image is in the file index under its listed stamp (no bytes needed)."""
        return record.stamp is not None and self.index.get(IMAGE_KIND, record.stamp) is not None

    @staticmethod
    def _stamp(path: str | os.PathLike, stamp: FileStamp | None) -> FileStamp:
        if stamp is not None:
            return stamp
        try:
            return local_stamp(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read the image ({exc.strerror or exc}). Replace or remove the file.") from exc

    def inspect(self, path: str | os.PathLike, stamp: FileStamp | None = None) -> ImageInfo:
        """Content hash and size of an image file (header only); DataError when it is unusable.

        Kept in the file index under the file's stamp (`stamp`, else path, size and mtime from one
        `stat`): the bytes of a file are read once, across runs; an edited file is read again.
        """
        stamp = self._stamp(path, stamp)
        value = self.index.get(IMAGE_KIND, stamp)
        if value is not None:
            return ImageInfo(digest=str(value["sha256"]), original_size=(int(value["h"]), int(value["w"])))
        size = image_size(path, max_pixels=self.max_pixels)
        info = ImageInfo(digest=file_digest(path), original_size=size)
        self.index.put(IMAGE_KIND, stamp, {"sha256": info.digest, "h": size[0], "w": size[1]})
        return info

    def _plan_kind(self, spec: DatasetSpec) -> str:
        """The file index kind of the plans made under `spec`'s sizing and this cache's settings."""
        kind = self._plan_kinds.get(spec.rule)
        if kind is None:
            settings = {"rule": dataclasses.asdict(spec.rule), "seed": self.seed, **self._key_settings}
            kind = self._plan_kinds[spec.rule] = f"{PLAN_KIND}:{cache_key(PLAN_KIND, settings)[:16]}"
        return kind

    def planned(self, record: ImageRecord, spec: DatasetSpec) -> LatentPlan:
        """The image's cache key, hash and crop plan under `spec`'s sizing.

        Remembered in the file index under the image's stamp and these settings, so a restart over an
        unchanged dataset neither reads the image nor recomputes its plan and key.
        """
        stamp = self._stamp(record.path, record.stamp)
        kind = self._plan_kind(spec)
        planned = self._plans.get((kind, stamp))
        if planned is not None:
            return planned
        memo = self.index.get(kind, stamp)
        if memo is not None:
            try:
                planned = _plan_from_fields([memo["key"], memo["sha256"], *memo["o"], *memo["r"], *memo["c"],
                                             *memo["t"]])
            except (KeyError, TypeError, ValueError):
                pass  # another build's entry: plan it again
        if planned is None:
            info = self.inspect(record.path, stamp)
            # The random crop is drawn from the image *content*, so moving a dataset keeps its crops and cache.
            plan = spec.rule.plan(info.original_size, self.seed, image_key=info.digest)
            planned = LatentPlan(key=self._latent_key(info.digest, plan, False), digest=info.digest, plan=plan)
            self.index.put(kind, stamp, {"key": planned.key, "sha256": info.digest, "o": plan.original_size,
                                         "r": plan.resized_size, "c": plan.crop_top_left, "t": plan.target_size})
        self._plans[(kind, stamp)] = planned
        return planned

    def _latent_key(self, digest: str, plan: CropPlan, flipped: bool) -> str:
        parts = {
            "image_sha256": digest,
            "original_size": plan.original_size,
            "resized_size": plan.resized_size,
            "crop_top_left": plan.crop_top_left,
            "target_size": plan.target_size,
            **self._key_settings,
            "flip": flipped,
        }
        return cache_key(LATENT_KIND, parts)

    def flipped(self, planned: LatentPlan) -> LatentPlan:
        """The entry of the mirrored image: its mirrored crop coordinates and its own key."""
        plan = mirror_plan(planned.plan)
        return LatentPlan(self._latent_key(planned.digest, plan, True), planned.digest, plan, flipped=True)

    def variants(self, planned: LatentPlan) -> list[LatentPlan]:
        """The entries an image needs: itself, and its mirror image with flip_images."""
        return [planned, self.flipped(planned)] if self.flip else [planned]

    def flips_at(self, epoch: int, index: int) -> bool:
        """Whether the item at `index` trains flipped in `epoch` (always False without flip_images)."""
        return self.flip and flip_chosen(self.seed, epoch, index)

    def plan_each(self, records: Sequence[ImageRecord], spec: DatasetSpec
                  ) -> Iterator[tuple[ImageRecord, LatentPlan | DataError]]:
        """(record, its `planned`) for each record in turn, or (record, the DataError that says why it cannot
        be used). The folder entries are put in the index when the iteration ends: iterate to the end.

        Records the walk gave a folder listing (`ImageRecord.listing`) are planned a folder at a time: one
        whole-folder entry of the index (`FileIndex.folders`) holds the plans of every image of a folder whose
        listing is unchanged, so a restart over an unchanged dataset does one lookup per folder, not per image.
        """
        kind = self._plan_kind(spec)
        folders = FolderEntries(self.index, kind, "p")  # {image name: plan fields}
        for record in records:
            listing = record.listing
            if listing is None or record.stamp is None:
                try:
                    yield record, self.planned(record, spec)
                except DataError as error:
                    yield record, error
                continue
            name = record.path.name
            fields = folders.known(listing).get(name)
            planned = self._plans.get((kind, record.stamp))
            if planned is None and fields is not None:
                try:
                    planned = self._plans[(kind, record.stamp)] = _plan_from_fields(fields)
                except (TypeError, ValueError):
                    fields = None  # another build's entry: plan it again
            if planned is None:
                try:
                    planned = self.planned(record, spec)
                except DataError as error:
                    yield record, error
                    continue
            if fields is None:
                folders.learn(listing, name, _plan_fields(planned))
            yield record, planned
        folders.remember()

    def key_for(self, record: ImageRecord, spec: DatasetSpec) -> str:
        return self.planned(record, spec).key

    def ensure(self, items: Sequence[tuple[ImageRecord, DatasetSpec]], *, progress: bool = True) -> CacheStats:
        """Encode every entry missing from its dataset's store; counts are over distinct (store, key) entries.

        Safe beside other processes filling the same stores (see `expertune.cache.store`). An image
        that cannot be read or decoded is not encoded: it is returned in `failed` with the reason.
        """
        missing: dict[str, Pending[tuple[ImageRecord, LatentPlan]]] = {}
        seen: set[tuple[Path, str]] = set()
        failed: dict[str, str] = {}
        reused = 0
        wanted: list[tuple[ImageRecord, LatentPlan, CacheStore]] = []
        keys: dict[CacheStore, list[str]] = {}  # store -> the keys wanted of it
        for record, spec in items:
            try:
                planned = self.planned(record, spec)
            except DataError as error:
                failed.setdefault(str(record.path), str(error))
                continue
            store = self.store_for(spec)
            for variant in self.variants(planned):
                if (store.root, variant.key) not in seen:
                    seen.add((store.root, variant.key))
                    wanted.append((record, variant, store))
                    keys.setdefault(store, []).append(variant.key)
        absent = {store: store.missing(wanted_keys) for store, wanted_keys in keys.items()}
        for record, planned, store in wanted:
            if planned.key not in absent[store]:
                reused += 1
            elif planned.key in missing:
                entry = missing[planned.key]
                entry.stores = (*entry.stores, store)
            else:
                missing[planned.key] = Pending(planned.key, (store,), (record, planned), planned.plan.target_size)

        # Same target size in one batch; a fixed order so batches (and their numerics) are reproducible.
        order = sorted(missing.values(), key=lambda e: (e.group, str(e.item[0].path)))
        written = 0
        if order:
            with tqdm(total=len(order), desc="caching latents", unit="img", disable=not progress) as bar:
                result = fill_entries(order, batch_size=self.batch_size, encode=self._encode_batch, progress=bar)
            written, reused = result.written, reused + result.found
            for (record, _), reason in result.failed:
                if reason.startswith("not cached:"):  # NonFiniteEntry: the VAE's output, not the image
                    reason += (f" in the latent of {record.path}: the VAE ({self.dtype}) overflowed or is damaged; "
                               "an fp16 SDXL VAE needs the fp16-fix VAE, or encode in float32")
                failed.setdefault(str(record.path), reason)
        return CacheStats(encoded=written, reused=reused, failed=tuple(failed.items()))

    def _encode_batch(self, batch: list[tuple[ImageRecord, LatentPlan]]) -> list[Encoded | str]:
        loaded: list[torch.Tensor | str] = []
        for record, planned in batch:
            try:
                loaded.append(image_to_tensor(load_image(record.path, max_pixels=self.max_pixels), planned.plan,
                                              flip=planned.flipped))
            except DataError as error:  # truncated, undecodable: reported by the caller, the batch goes on
                loaded.append(str(error))
        good = [pixels for pixels in loaded if isinstance(pixels, torch.Tensor)]
        latents = iter(self.encode_pixels(torch.stack(good)) if good else ())
        outputs: list[Encoded | str] = []
        for (record, planned), pixels in zip(batch, loaded):
            if isinstance(pixels, str):
                outputs.append(pixels)
                continue
            time_ids = torch.tensor(planned.plan.time_ids(), dtype=torch.int64)
            metadata = {
                "source": os.fspath(record.path),
                "image_sha256": planned.digest,
                "time_ids": ",".join(str(v) for v in planned.plan.time_ids()),
                "resized_size": ",".join(str(v) for v in planned.plan.resized_size),
                "decode": DECODE_VERSION,
                "vae_fingerprint": self.fingerprint,
                "vae_dtype": str(self.dtype),
                "statistic": LATENT_STATISTIC,
            }
            if planned.flipped:
                metadata["flip"] = "true"
            outputs.append(({"latent": next(latents), "time_ids": time_ids}, metadata))
        return outputs

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latent means of a [B, 3, H, W] batch in [-1, 1], computed in the VAE's dtype, on its device."""
        return encode_latents(self.vae, pixels)

    def load(self, record: ImageRecord, spec: DatasetSpec, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [4, h, w] float32, already scaled; time_ids [6] float32, or [5] with the refiner's
        `TimeIdLayout`) of a cached image, or of its mirror image with `flipped` (flip_images)."""
        planned = self.planned(record, spec)
        if flipped:
            planned = self.flipped(planned)
        store = self.store_for(spec)
        entry = store.get(planned.key)
        tensors = entry[0] if entry is not None else {}
        latent, time_ids = tensors.get("latent"), tensors.get("time_ids")
        if latent is None or time_ids is None or latent.ndim != 3 or tuple(time_ids.shape) != (6,):
            raise DataError(
                f"{record.path}: no usable cached latent in {store.root} (key {planned.key}). "
                "Run the latent caching step (`expertune cache`, or LatentCache.ensure) for this dataset first."
            )
        return latent.to(torch.float32), self.time_ids(time_ids.to(torch.float32))


def same_vae(a: SDXLComponents, b: SDXLComponents) -> bool:
    """Whether two models' VAEs are the same (class, config, weights, dtype): then they share every latent."""
    if a.vae is b.vae:
        return True
    return (next(a.vae.parameters()).dtype == next(b.vae.parameters()).dtype
            and module_fingerprint(a.vae) == module_fingerprint(b.vae))


def check_shared_vae(components: Sequence[SDXLComponents], names: Sequence[str]) -> None:
    """Refuse models whose VAEs differ where one latent cache must serve them all (experts of one mixture).

    `names` says how the message names each model (e.g. "expert 1 (stabilityai/...)"); ConfigError naming the
    first two that differ, their VAE fingerprints, and the fix.
    """
    if len(components) != len(names):
        raise ValueError(f"{len(components)} models but {len(names)} names")
    for index in range(1, len(components)):
        if not same_vae(components[0], components[index]):
            first, other = components[0], components[index]
            raise ConfigError(
                f"{names[0]} ({first.source}) and {names[index]} ({other.source}) have different VAEs "
                f"(fingerprints {module_fingerprint(first.vae)[:12]} and {module_fingerprint(other.vae)[:12]}, "
                f"dtypes {next(first.vae.parameters()).dtype} and {next(other.vae.parameters()).dtype}): their "
                "latents differ, so one latent cache cannot serve both and a chain would hand one expert latents "
                "of another VAE. Use models that ship the same VAE weights, or replace the vae/ folder of "
                f"{other.source} with that of {first.source}"
            )
