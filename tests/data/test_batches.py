from __future__ import annotations

import torch

from expertune.data.batches import Bucket, batches_per_epoch, drop_captions, epoch_batches, epoch_order, micro_batches
from expertune.objective.loss import TrainingBatch


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


def _buckets() -> list[Bucket]:
    # Two datasets; "a" has a square and a landscape bucket, "b" one bucket smaller than a batch.
    return [
        Bucket("a", (64, 64), tuple(range(0, 9))),
        Bucket("a", (64, 128), tuple(range(9, 14))),
        Bucket("b", (64, 64), (14, 15)),
    ]


def _epoch(buckets, batch_size, seed, epoch, **kwargs):
    stream = micro_batches(buckets, batch_size, seed, start_epoch=epoch, **kwargs)
    return _take(stream, batches_per_epoch(buckets, batch_size, kwargs.get("world_size", 1)))


def test_micro_batches_are_bucket_homogeneous_and_visit_every_item_once() -> None:
    buckets = _buckets()
    home = {index: (bucket.dataset, bucket.size) for bucket in buckets for index in bucket.indices}
    assert batches_per_epoch(buckets, 4) == 3 + 2 + 1  # ceil(9/4) + ceil(5/4) + ceil(2/4)
    for epoch in range(3):
        batches = _epoch(buckets, 4, seed=1, epoch=epoch)
        assert all(b.epoch == epoch for b in batches)
        assert sorted(i for b in batches for i in b.indices) == list(range(16))
        for b in batches:
            assert len({home[i] for i in b.indices}) == 1, b  # one dataset, one size
        # The small bucket is served as one short batch, not merged or dropped.
        assert any(sorted(b.indices) == [14, 15] for b in batches)
        positions = [b.position for b in batches]
        assert positions[0] == 0 and positions == sorted(positions)
    # A pure function of (seed, epoch): a fresh stream starting at an epoch gives the same batches.
    assert _epoch(buckets, 4, 1, 2) == _take(micro_batches(buckets, 4, 1), 18)[12:]
    assert _epoch(buckets, 4, 1, 0) != _epoch(buckets, 4, 1, 1)
    assert _epoch(buckets, 4, 1, 0) != _epoch(buckets, 4, 2, 0)


def test_ranks_split_bucket_batches_without_overlap() -> None:
    buckets = _buckets()
    steps = batches_per_epoch(buckets, 2, world_size=2)
    globals_ = epoch_batches(buckets, 4, seed=5, epoch=0, world_size=2)
    assert len(globals_) == steps == 4  # each of bucket a's lone last items joins the batch before it
    per_rank = [_epoch(buckets, 2, seed=5, epoch=0, rank=rank, world_size=2) for rank in range(2)]
    for step, whole in enumerate(globals_):
        ours, theirs = set(per_rank[0][step].indices), set(per_rank[1][step].indices)
        assert ours and theirs and not ours & theirs  # every rank gets a share of every global batch
        assert ours | theirs == set(whole)
    assert sorted(i for whole in globals_ for i in whole) == list(range(16))
    # A bucket smaller than the number of ranks repeats its item rather than starving a rank.
    tiny = [Bucket("a", (8, 8), (0, 1, 2, 3)), Bucket("a", (8, 16), (4,))]
    shares = [_epoch(tiny, 2, seed=0, epoch=0, rank=rank, world_size=2) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2] and any(b.indices == (4,) for b in shares[1])


def test_dataset_probability_orders_batches_but_never_changes_counts() -> None:
    heavy = [Bucket("a", (8, 8), tuple(range(0, 40)), weight=0.9), Bucket("b", (8, 8), tuple(range(40, 80)), weight=0.1)]
    light = [Bucket("a", (8, 8), tuple(range(0, 40)), weight=0.1), Bucket("b", (8, 8), tuple(range(40, 80)), weight=0.9)]

    def mean_position_of_a(buckets) -> float:
        positions = []
        for epoch in range(5):
            batches = epoch_batches(buckets, 4, seed=0, epoch=epoch)
            assert sorted(i for b in batches for i in b) == list(range(80))  # each item once, whatever p
            positions += [n for n, b in enumerate(batches) if b[0] < 40]
        return sum(positions) / len(positions)

    # 10 batches each, 20 in all: with p_a = 0.9 dataset a comes first (places 0..9 -> 4.5), with 0.1 last.
    assert mean_position_of_a(heavy) < 6.5 < 12.5 < mean_position_of_a(light)  # uniform: 9.5


def test_micro_batches_carry_their_global_size_and_the_epoch_end() -> None:
    buckets = _buckets()
    per_rank = [_epoch(buckets, 2, seed=5, epoch=0, rank=rank, world_size=2) for rank in range(2)]
    globals_ = epoch_batches(buckets, 4, seed=5, epoch=0, world_size=2)
    assert [b.global_size for b in per_rank[0]] == [len(g) for g in globals_] == [b.global_size for b in per_rank[1]]
    assert [b.epoch_end for b in per_rank[0]] == [False] * (len(globals_) - 1) + [True]
