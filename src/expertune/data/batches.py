"""Training examples read from the caches, their epoch order, and micro-batches.

Every micro-batch holds the items of one `Bucket` — one dataset's images of one training size — so
its latents stack. The order of an epoch is a pure function of (seed, epoch) and the buckets, so a
run's data position is just (epoch, position) — the seam exact resume and per-rank sharding build
on. Every item is visited exactly once per epoch (a dataset's `repeats` list an image several times).

How an epoch is laid out (`epoch_batches`):

1. each bucket's items are shuffled and cut into global batches of `batch_size * world_size`; the
   last one of a bucket may be short — it is kept, never dropped nor padded with other sizes;
2. each dataset's global batches (of all its buckets) are shuffled together;
3. the datasets' batch queues are interleaved: the next batch comes from dataset d with probability
   `p_d / sum(p)` over the datasets that still have batches left in this epoch (`p` is the dataset's
   `probability`). A dataset with a higher probability is drawn earlier and more densely; none is
   drawn more or less often than once per item per epoch.

With several processes each global batch is split by rank (`rank::world_size`), and every rank
must get a share of every global batch: a bucket's last batch with fewer than `world_size` items
is merged into the one before it, and a bucket smaller than `world_size` repeats its own items —
the one case where an item is seen twice in an epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from expertune.data.dataloader import DatasetSpec
    from expertune.data.records import ImageRecord


@dataclass
class TrainingBatch:
    """Cached tensors for one micro-batch (everything the UNet needs besides noise and t)."""

    latents: torch.Tensor  # [B, 4, h, w], already scaled by the VAE's scaling factor
    prompt_embeds: torch.Tensor  # [B, 77, d1 + d2]
    pooled_embeds: torch.Tensor  # [B, d_pool]
    time_ids: torch.Tensor  # [B, 6]: orig_h, orig_w, crop_top, crop_left, target_h, target_w (refiner: [B, 5])
    masks: torch.Tensor | None = None  # issue 23: [B, 1, h, w] loss masks on the latent grid (data/masks.py)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "TrainingBatch":
        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype, non_blocking=non_blocking)

        return TrainingBatch(moved(self.latents), moved(self.prompt_embeds), moved(self.pooled_embeds),
                             moved(self.time_ids),
                             None if self.masks is None else self.masks.to(device=device, non_blocking=non_blocking))

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])


@dataclass(frozen=True)
class TimeIdLayout:
    """How a cached crop's six SDXL time ids become the added time ids a UNet is conditioned on.

    `aesthetic_score` None: SDXL base's six, as cached (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w). A number: the SDXL refiner's five, (orig_h, orig_w, crop_top, crop_left, aesthetic_score), as
    diffusers' `StableDiffusionXLImg2ImgPipeline._get_add_time_ids` builds them with
    `requires_aesthetics_score=True`. The latent cache stores the six either way, so the two layouts share it.
    """

    aesthetic_score: float | None = None

    @property
    def count(self) -> int:
        return 6 if self.aesthetic_score is None else 5

    def __call__(self, time_ids: torch.Tensor) -> torch.Tensor:
        """[..., 6] cached time ids → [..., count]."""
        if self.aesthetic_score is None:
            return time_ids
        return refiner_time_ids(time_ids, self.aesthetic_score)


def refiner_time_ids(time_ids: torch.Tensor, aesthetic_score: float) -> torch.Tensor:
    """[..., 6] SDXL time ids → the refiner's [..., 5]: the original size and crop, then the aesthetic score."""
    score = torch.full((*time_ids.shape[:-1], 1), float(aesthetic_score), dtype=time_ids.dtype,
                       device=time_ids.device)
    return torch.cat([time_ids[..., :4], score], dim=-1)


@dataclass(frozen=True)
class TrainingItem:
    """One image of one dataset to train on (a dataset's `repeats` list it several times)."""

    record: "ImageRecord"
    spec: "DatasetSpec"

    @property
    def captions(self) -> tuple[str, ...]:
        return self.record.captions


@dataclass(frozen=True)
class Bucket:
    """Items that may share a micro-batch: one dataset's images of one training size."""

    dataset: str
    size: tuple[int, int]  # (height, width) in pixels
    indices: tuple[int, ...]  # into the run's item list
    weight: float = 1.0  # the dataset's `probability`

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class MicroBatch:
    epoch: int
    position: int  # how many items of the epoch's order come before this batch's global batch
    indices: tuple[int, ...]  # this rank's items: the global batch's [rank::world_size]
    global_size: int  # items in the global batch, over all ranks
    epoch_end: bool = False  # the last global batch of its epoch


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of the items for one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def as_buckets(buckets: int | Sequence[Bucket]) -> list[Bucket]:
    """`buckets` as a list; a plain item count is one bucket holding every item."""
    if isinstance(buckets, int):
        return [Bucket(dataset="", size=(0, 0), indices=tuple(range(buckets)))]
    return [bucket for bucket in buckets if bucket.indices]


def epoch_batches(
    buckets: Sequence[Bucket], global_size: int, seed: int, epoch: int, *, world_size: int = 1
) -> list[tuple[int, ...]]:
    """The global batches of one epoch, in order; each holds items of one bucket (see the module doc)."""
    if global_size < 1 or world_size < 1 or global_size % world_size:
        raise ValueError(f"global batch size {global_size} must be a positive multiple of world_size {world_size}")
    queues: dict[str, list[tuple[int, ...]]] = {}
    weights: dict[str, float] = {}
    for bucket in buckets:
        if not bucket.weight > 0:
            raise ValueError(f"bucket {bucket.dataset}/{bucket.size}: weight must be > 0, got {bucket.weight}")
        order = torch.randperm(len(bucket.indices), generator=_generator(seed, epoch, bucket.dataset, bucket.size))
        shuffled = [bucket.indices[i] for i in order.tolist()]
        while len(shuffled) < world_size:  # every rank needs a share: a tiny bucket repeats its items
            shuffled += shuffled[: world_size - len(shuffled)]
        chunks = [tuple(shuffled[start : start + global_size]) for start in range(0, len(shuffled), global_size)]
        if len(chunks) > 1 and len(chunks[-1]) < world_size:
            chunks[-2:] = [chunks[-2] + chunks[-1]]
        queues.setdefault(bucket.dataset, []).extend(chunks)
        weights[bucket.dataset] = float(bucket.weight)
    for dataset, chunks in queues.items():
        if len(chunks) > 1:
            order = torch.randperm(len(chunks), generator=_generator(seed, epoch, dataset, "batches")).tolist()
            queues[dataset] = [chunks[i] for i in order]
    names = list(queues)
    if len(names) == 1:
        return queues[names[0]]
    picker = _generator(seed, epoch, "datasets")
    heads = {name: 0 for name in names}
    result: list[tuple[int, ...]] = []
    while True:
        live = [name for name in names if heads[name] < len(queues[name])]
        if not live:
            return result
        draw = float(torch.rand((), generator=picker)) * sum(weights[name] for name in live)
        chosen = live[-1]
        for name in live:
            draw -= weights[name]
            if draw < 0:
                chosen = name
                break
        result.append(queues[chosen][heads[chosen]])
        heads[chosen] += 1


def micro_batches(
    buckets: int | Sequence[Bucket],
    batch_size: int,
    seed: int,
    *,
    start_epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[MicroBatch]:
    """An endless stream of bucket-homogeneous micro-batches, epoch after epoch.

    `buckets` is the run's buckets, or a plain item count (one bucket of all items). A bucket's short
    last batch is kept, not dropped. With several processes each global batch of
    `batch_size * world_size` items is split by rank.
    """
    groups = as_buckets(buckets)
    if not groups:
        raise ValueError("no training items")
    epoch = start_epoch
    global_size = batch_size * world_size
    while True:
        position = 0
        batches = epoch_batches(groups, global_size, seed, epoch, world_size=world_size)
        for number, chunk in enumerate(batches):
            yield MicroBatch(epoch=epoch, position=position, indices=tuple(chunk[rank::world_size]),
                             global_size=len(chunk), epoch_end=number == len(batches) - 1)
            position += len(chunk)
        epoch += 1


def batches_per_epoch(buckets: int | Sequence[Bucket], batch_size: int, world_size: int = 1) -> int:
    """Global batches in one epoch: each bucket's items in batches of `batch_size * world_size`."""
    global_size = batch_size * world_size
    count = 0
    for bucket in as_buckets(buckets):
        size = max(len(bucket.indices), world_size)
        full, tail = divmod(size, global_size)
        count += full + (1 if tail >= world_size or (tail and not full) else 0)
    return count


def caption_for(item: TrainingItem, epoch: int) -> str:
    """Items with several captions rotate through them, one per epoch."""
    return item.captions[epoch % len(item.captions)]


def collate(latents: Sequence[torch.Tensor], time_ids: Sequence[torch.Tensor],
            embeds: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> TrainingBatch:
    return TrainingBatch(
        latents=torch.stack(list(latents)),
        prompt_embeds=torch.stack([e[0] for e in embeds]),
        pooled_embeds=torch.stack([e[1] for e in embeds]),
        time_ids=torch.stack(list(time_ids)).float(),
    )


def drop_captions(batch: TrainingBatch, keep: torch.Tensor) -> TrainingBatch:
    """Zero the text conditioning of the samples where `keep` is False (caption dropout).

    Zeros are what SDXL pipelines feed as the unconditional branch (`force_zeros_for_empty_prompt`),
    so caption dropout trains exactly the input classifier-free guidance uses.
    """
    if bool(keep.all()):
        return batch
    mask = keep.to(device=batch.latents.device, dtype=batch.prompt_embeds.dtype)
    return TrainingBatch(
        latents=batch.latents,
        prompt_embeds=batch.prompt_embeds * mask.view(-1, 1, 1),
        pooled_embeds=batch.pooled_embeds * mask.view(-1, 1),
        time_ids=batch.time_ids,
        masks=batch.masks,
    )
