"""The judges of a chain: colour accuracy, sub-bands that respect the hand-off, owners of each timestep."""

from __future__ import annotations

import pytest

from expertune.experts import ExpertBand
from expertune.world.evaluate import chain_subbands, colour_accuracy
from expertune.world.scene import Combination, all_combinations, render, scenes


def test_colour_judge_scores_drawn_images_perfectly_and_swapped_prompts_not_at_all() -> None:
    drawn = scenes(all_combinations()[:30], 1, seed=3)
    images = [render(s) for s in drawn]
    right = colour_accuracy(images, [s.caption for s in drawn])
    assert (right.shape_colour, right.background, right.both) == (1.0, 1.0, 1.0)
    swapped = [Combination(s.combination.bg, s.combination.shape, s.combination.fg).caption for s in drawn]
    wrong = colour_accuracy(images, swapped)
    assert (wrong.shape_colour, wrong.background, wrong.both) == (0.0, 0.0, 0.0)


def test_chain_subbands_never_straddle_the_hand_off() -> None:
    bands = chain_subbands((350,), 1000, 8)
    assert len(bands) == 8 and bands[0].lo == 0 and bands[-1].hi == 999
    assert [b for b in bands if b.lo < 350 <= b.hi] == []
    assert sum(b.hi < 350 for b in bands) == 3  # 350 / 1000 of 8 sub-bands, rounded
    assert all(a.hi + 1 == b.lo for a, b in zip(bands, bands[1:]))
    assert chain_subbands((), 1000, 8) == [ExpertBand(lo, lo + 124, 1000) for lo in range(0, 1000, 125)]


def test_a_subband_without_an_owner_is_refused() -> None:
    from expertune.infer.chain import ChainStage
    from expertune.world.evaluate import chain_held_out_loss

    stage = ChainStage({"unet": None}, ExpertBand(350, 999, 1000))
    with pytest.raises(ValueError, match="the experts of the chain do not cover sub-band"):
        chain_held_out_loss([stage], [], None, [ExpertBand(0, 349, 1000)])


def test_each_timestep_of_a_straddling_subband_is_scored_by_its_owner() -> None:
    """Sub-bands cut for one hand-off (350) scored on a chain of three: the sub-band across t = 700 mixes the
    two experts that own its two pieces, and a change to one expert moves only the sub-bands it owns part of."""
    import copy

    import torch

    from expertune.infer.chain import ChainStage
    from expertune.schedule import NoiseSchedule
    from expertune.world import PRETRAINED
    from expertune.world.evaluate import base_stages, chain_held_out_loss, held_out_samples

    base = base_stages(PRETRAINED / "base")[0]
    drawn = scenes(all_combinations()[:2], 1, seed=5)
    samples = held_out_samples(base, [render(s) for s in drawn], [s.caption for s in drawn])
    schedule = NoiseSchedule.from_scheduler_config(dict(base.components["scheduler"].config))
    broken = copy.deepcopy(base.components["unet"])
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.zero_()
    def chain(top):
        return [ChainStage({**base.components, "unet": top}, ExpertBand(700, 999, 1000)),
                ChainStage(base.components, ExpertBand(350, 699, 1000)),
                ChainStage(base.components, ExpertBand(0, 349, 1000))]
    subbands = chain_subbands((350,), 1000, 8)
    same = chain_held_out_loss(chain(base.components["unet"]), samples, schedule, subbands, seed=1)
    moved = chain_held_out_loss(chain(broken), samples, schedule, subbands, seed=1)
    straddling = [b for b in subbands if b.lo < 700 <= b.hi]
    assert len(straddling) == 1
    for band in subbands:
        key = f"eval/loss_{band.lo}_{band.hi}"
        assert (moved[key] != same[key]) == (band.hi >= 700), key
