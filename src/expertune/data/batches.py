"""Training examples read from the caches, their epoch order, and micro-batches.

The order of an epoch is a pure function of (seed, epoch), so a run's data position is just
(epoch, index) — the seam exact resume and per-rank sharding build on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from expertune.train.loss import TrainingBatch

if TYPE_CHECKING:
    from expertune.data.records import DatasetSpec, ImageRecord


@dataclass(frozen=True)
class TrainingItem:
    """One image of one dataset to train on (a dataset's `repeats` list it several times)."""

    record: "ImageRecord"
    spec: "DatasetSpec"

    @property
    def captions(self) -> tuple[str, ...]:
        return self.record.captions


@dataclass(frozen=True)
class MicroBatch:
    epoch: int
    position: int  # index of the global batch's first item in the epoch's order
    indices: tuple[int, ...]  # this rank's items: the global batch's [rank::world_size]
    global_size: int  # items in the global batch, over all ranks


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of the items for one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def micro_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    *,
    start_epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[MicroBatch]:
    """An endless stream of micro-batches, epoch after epoch. A short last batch is kept, not dropped.

    With several processes each global batch of `batch_size * world_size` items is split by rank
    (`[rank::world_size]`); the epoch's last global batch is then filled up to full size with items from
    the start of the epoch's order (as torch's DistributedSampler pads), so every rank has the same work.
    """
    if num_items < 1:
        raise ValueError("no training items")
    epoch = start_epoch
    global_size = batch_size * world_size
    while True:
        order = epoch_order(num_items, seed, epoch)
        for start in range(0, num_items, global_size):
            chunk = order[start : start + global_size]
            if world_size > 1 and len(chunk) < global_size:
                chunk = chunk + [order[i % num_items] for i in range(global_size - len(chunk))]
            yield MicroBatch(epoch=epoch, position=start, indices=tuple(chunk[rank::world_size]),
                             global_size=len(chunk))
        epoch += 1


def batches_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    return -(-num_items // (batch_size * world_size))


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
    )
