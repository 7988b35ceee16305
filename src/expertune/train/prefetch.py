"""The next step's batches, read while this step runs (issue 25, item 2: the host out of the accelerator's way).

Each step needs `gradient_accumulation_steps` micro-batches, each read from the latent and embedding caches (a
small safetensors file per image and caption) and stacked. `BatchFeed` takes an expert's micro-batches from its
stream on the main thread, exactly as before, and hands the reading and collating of the *next* step's to one
background thread (pinning the tensors when the device is CUDA, so the copy to the device is asynchronous). The
stream is advanced only on the main thread and in the same order, so the batches, their order and the run's
results are the same with or without prefetching; a data position saved in a checkpoint counts the micro-batches
trained, never those read ahead.

In a mixture job each expert has its own stream: the read-ahead is kept per expert until its next turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from expertune.data.batches import MicroBatch, TrainingBatch, caption_for, collate

if TYPE_CHECKING:
    from expertune.prepare import PreparedData
    from expertune.train.setup import ExpertRun, Run


def load_batch(prepared: PreparedData, micro: MicroBatch, pin: bool = False) -> TrainingBatch:
    """The micro-batch's cached latents (flipped ones where the epoch's coin says so), time ids, embeddings and loss
    masks when the data has them, stacked (in page-locked memory when `pin`)."""
    latents, time_ids, embeds, masks = [], [], [], []
    masked = prepared.mask_cache is not None and any(prepared.items[i].spec.has_masks for i in micro.indices)
    for index in micro.indices:
        item = prepared.items[index]
        flipped = prepared.latent_cache.flips_at(micro.epoch, index)  # issue 23: --flip_images
        latent, ids = prepared.latent_cache.load(item.record, item.spec, flipped)
        latents.append(latent)
        time_ids.append(ids)
        embeds.append(prepared.embed_cache.load(caption_for(item, micro.epoch)))
        if masked and prepared.mask_cache is not None:
            masks.append(prepared.mask_cache.load(item.record, item.spec, flipped))
    batch = collate(latents, time_ids, embeds)
    if masks:
        batch.masks = torch.stack(masks)
    if pin:
        batch = TrainingBatch(batch.latents.pin_memory(), batch.prompt_embeds.pin_memory(),
                              batch.pooled_embeds.pin_memory(), batch.time_ids.pin_memory(),
                              None if batch.masks is None else batch.masks.pin_memory())
    return batch


@dataclass
class _ReadAhead:
    stream: Iterator[MicroBatch]  # the stream the micro-batches came from (a resume may replace an expert's)
    micros: list[MicroBatch]
    batches: Future[list[TrainingBatch]]


class BatchFeed:
    """Hands out each step's (micro-batch, batch) pairs; with `prefetch`, reads the next step's in the background.

    Use as a context manager: leaving it (a finished run, a stop, an error) cancels what was read ahead and
    joins the thread, so no thread outlives the loop."""

    def __init__(self, run: Run, prefetch: bool) -> None:
        self.run = run
        self.pin = prefetch and run.accelerator.device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="expertune-prefetch") if prefetch else None
        self.ahead: dict[int, _ReadAhead] = {}

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for pending in self.ahead.values():
            pending.batches.cancel()
        self.ahead.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _read(self, prepared: PreparedData, micros: list[MicroBatch]) -> list[TrainingBatch]:
        return [load_batch(prepared, micro, self.pin) for micro in micros]

    def take(self, expert: ExpertRun, count: int) -> list[tuple[MicroBatch, TrainingBatch]]:
        """The expert's next `count` micro-batches and their batches (on the host; `to_device` copies them)."""
        stream = expert.stream
        assert stream is not None
        prepared = expert.prepared
        pending = self.ahead.pop(expert.index, None)
        micros: list[MicroBatch] = []
        batches: list[TrainingBatch] = []
        if pending is not None and pending.stream is stream:
            micros, batches = list(pending.micros), pending.batches.result()
        elif pending is not None:  # a replaced stream: what was read ahead is not what comes next
            pending.batches.cancel()
        if len(micros) < count:
            more = [next(stream) for _ in range(count - len(micros))]
            micros, batches = micros + more, batches + self._read(prepared, more)
        if self.pool is not None:
            following = [next(stream) for _ in range(count)]
            self.ahead[expert.index] = _ReadAhead(stream, following, self.pool.submit(self._read, prepared, following))
        return list(zip(micros, batches))

    def to_device(self, batch: TrainingBatch, dtype: torch.dtype | None) -> TrainingBatch:
        """`batch` on the run's device; a copy from pinned memory is asynchronous (the stream orders it)."""
        return batch.to(self.run.accelerator.device, dtype, non_blocking=self.pin)
