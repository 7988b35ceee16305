"""SimpleTuner's offset noise (issue 19): noise + strength * N(0, 1) of shape (B, C, 1, 1), per sample with a
probability; checked against the formula with the same generator draws."""

from __future__ import annotations

import torch

from expertune.experts import ExpertBand
from expertune.objective.loss import draw_randomness, offset_noise


def test_offset_noise_is_the_formula_per_sample() -> None:
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = offset_noise(noise, 0.1, 0.5, torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    offset = torch.randn((6, 4, 1, 1), generator=replay)
    chosen = torch.rand(6, generator=replay) < 0.5
    expected = noise + 0.1 * offset * chosen.float().view(6, 1, 1, 1)
    assert torch.equal(out, expected)
    assert 0 < int(chosen.sum()) < 6  # this seed offsets some samples and not others
    delta = out - noise
    for i in range(6):  # one constant per channel of an offset sample; nothing added to the others
        if chosen[i]:
            assert torch.allclose(delta[i], 0.1 * offset[i].expand(4, 8, 8))
        else:
            assert torch.equal(delta[i], torch.zeros(4, 8, 8))


def test_draws_without_offset_are_unchanged_and_probability_one_offsets_every_sample() -> None:
    band = ExpertBand(0, 999)
    plain = draw_randomness(band, torch.Generator().manual_seed(3), 4, (4, 8, 8))
    zero = draw_randomness(band, torch.Generator().manual_seed(3), 4, (4, 8, 8), noise_offset=0.0)
    assert torch.equal(plain.noise, zero.noise)  # no extra draw: runs without offset noise are bit for bit as before
    offset = draw_randomness(band, torch.Generator().manual_seed(3), 4, (4, 8, 8), noise_offset=0.2,
                             noise_offset_probability=1.0)
    assert torch.equal(offset.timesteps, plain.timesteps) and torch.equal(offset.keep_caption, plain.keep_caption)
    shift = (offset.noise - plain.noise).flatten(2)
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6) and bool((shift[:, :, 0].abs() > 0).all())
