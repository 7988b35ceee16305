from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from expertune.train.ema import ExponentialMovingAverage, ema_decay


def test_decay_matches_diffusers_ema_model() -> None:
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    for update in range(1, 200):
        assert ema_decay(update, 0.999) == pytest.approx(reference.get_decay(update))
    assert ema_decay(1, 0.999) == 0.0 and ema_decay(10_000, 0.999) == 0.999


def test_updates_follow_the_formula_on_the_chosen_device() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ExponentialMovingAverage([weight], max_decay=0.5, device="cpu")
    assert ema.update([weight]) == 0.0  # first update copies the weights
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 6.0]))
    decay = ema.update([weight])  # (1 + 1) / (10 + 1) capped at 0.5
    assert decay == pytest.approx(2 / 11)
    torch.testing.assert_close(ema.shadow[0], decay * torch.tensor([1.0, 2.0]) + (1 - decay) * weight.detach())
    target = torch.nn.Parameter(torch.zeros(2))
    ema.copy_to([target])
    torch.testing.assert_close(target.detach(), ema.shadow[0])
    restored = ExponentialMovingAverage([weight], max_decay=0.5, device="cpu")
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2 and torch.equal(restored.shadow[0], ema.shadow[0])
