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
    assert [len(b.indices) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b.indices) == list(range(10))
    assert {b.epoch for b in batches} == {0}
    assert next(micro_batches(10, 4, seed=0, start_epoch=1)).epoch == 1


def test_ranks_share_each_global_batch_without_overlap() -> None:
    per_rank = [
        _take(micro_batches(12, 3, seed=5, rank=rank, world_size=2), batches_per_epoch(12, 3, 2))
        for rank in range(2)
    ]
    assert all(b.global_size == 6 for b in per_rank[0])
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
    keep = torch.rand(64, generator=torch.Generator().manual_seed(0)) >= 0.5
    dropped = drop_captions(batch, keep)
    zeroed = dropped.prompt_embeds.flatten(1).abs().sum(1) == 0
    assert torch.equal(zeroed, ~keep) and 10 < int(zeroed.sum()) < 54
    assert torch.equal(zeroed, dropped.pooled_embeds.abs().sum(1) == 0)
    assert torch.equal(dropped.latents, batch.latents) and torch.equal(dropped.time_ids, batch.time_ids)
    assert drop_captions(batch, torch.ones(64, dtype=torch.bool)) is batch


def test_several_ranks_fill_the_last_global_batch_so_every_rank_has_work() -> None:
    per_rank = [_take(micro_batches(5, 2, seed=0, rank=r, world_size=2), 2) for r in range(2)]
    assert [len(b.indices) for b in per_rank[0]] == [2, 2] == [len(b.indices) for b in per_rank[1]]
    last = set(per_rank[0][1].indices) | set(per_rank[1][1].indices)
    order = epoch_order(5, 0, 0)
    assert order[4] in last and per_rank[0][1].global_size == 4
    assert [len(b.indices) for b in _take(micro_batches(5, 2, seed=0), 3)] == [2, 2, 1]  # one process: kept short
