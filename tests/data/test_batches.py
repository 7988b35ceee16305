from __future__ import annotations

import torch

from expertune.data.batches import batches_per_epoch, drop_captions, epoch_order, micro_batches
from expertune.train.loss import TrainingBatch


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(epoch_order(10, seed=1, epoch=0)) == list(range(10))
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert epoch_order(10, 1, 0) != epoch_order(10, 2, 0)


def test_every_item_once_per_epoch_and_a_short_last_batch_is_kept() -> None:
    batches = _take(micro_batches(10, 4, seed=0), batches_per_epoch(10, 4))
    assert sorted(len(b.indices) for b in batches) == [2, 4, 4]
    assert [b.position for b in batches] == [0, len(batches[0].indices), len(batches[0].indices) + len(batches[1].indices)]
    assert sorted(i for b in batches for i in b.indices) == list(range(10))
    assert {b.epoch for b in batches} == {0}
    assert next(micro_batches(10, 4, seed=0, start_epoch=1)).epoch == 1


def test_ranks_share_each_global_batch_without_overlap() -> None:
    per_rank = [
        _take(micro_batches(12, 3, seed=5, rank=rank, world_size=2), batches_per_epoch(12, 3, 2))
        for rank in range(2)
    ]
    single = _take(micro_batches(12, 6, seed=5), 2)
    for step in range(2):
        union = set(per_rank[0][step].indices) | set(per_rank[1][step].indices)
        assert union == set(single[step].indices)
        assert not set(per_rank[0][step].indices) & set(per_rank[1][step].indices)


def test_caption_dropout_zeroes_whole_samples_only() -> None:
    batch = TrainingBatch(
        latents=torch.ones(64, 4, 2, 2),
        prompt_embeds=torch.ones(64, 77, 8),
        pooled_embeds=torch.ones(64, 5),
        time_ids=torch.ones(64, 6),
    )
    dropped = drop_captions(batch, 0.5, torch.Generator().manual_seed(0))
    zeroed = dropped.prompt_embeds.flatten(1).abs().sum(1) == 0
    assert 10 < int(zeroed.sum()) < 54
    assert torch.equal(zeroed, dropped.pooled_embeds.abs().sum(1) == 0)
    assert torch.equal(dropped.latents, batch.latents) and torch.equal(dropped.time_ids, batch.time_ids)
    assert drop_captions(batch, 0.0, torch.Generator()) is batch
