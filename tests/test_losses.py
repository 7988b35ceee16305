"""Loss types (losses.py) against their closed forms, and through the training loss with a weighting."""

from __future__ import annotations

import math

import pytest
import torch

from expertune.losses import LossType, elementwise_loss, huber_threshold
from expertune.schedule import NoiseSchedule


def test_pseudo_huber_and_smooth_l1_closed_forms() -> None:
    r = torch.tensor([[0.0, 1e-3, 0.05, 0.1, 1.0, 10.0, -3.0]], dtype=torch.float64)
    c = 0.1
    target = torch.zeros_like(r)
    huber = elementwise_loss(r, target, "huber", torch.tensor([c]))
    smooth = elementwise_loss(r, target, "smooth_l1", torch.tensor([c]))
    for k, x in enumerate(r[0].tolist()):
        closed = 2 * c * (math.sqrt(x * x + c * c) - c)
        assert huber[0, k].item() == pytest.approx(closed, rel=1e-5, abs=1e-9)
        assert smooth[0, k].item() == pytest.approx(closed / c, rel=1e-5, abs=1e-8)
    # small residuals: MSE-like; large: linear with slope 2c
    assert huber[0, 1].item() == pytest.approx(1e-6, rel=1e-3)
    assert huber[0, 5].item() == pytest.approx(2 * c * 10.0 - 2 * c * c, rel=1e-3)
    assert torch.equal(elementwise_loss(r, target, "l2"), r.float().pow(2))


def test_each_sample_gets_its_own_threshold() -> None:
    prediction = torch.ones(2, 4, 2, 2)
    c = torch.tensor([0.1, 1.0])
    loss = elementwise_loss(prediction, torch.zeros_like(prediction), "huber", c).flatten(1).mean(1)
    assert loss.tolist() == pytest.approx([2 * 0.1 * (math.sqrt(1.01) - 0.1), 2 * (math.sqrt(2) - 1)], rel=1e-6)


def test_huber_schedules() -> None:
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    a = schedule.alphas_cumprod.double()
    t = torch.tensor([0, 250, 500, 999])
    c = 0.1
    assert huber_threshold(t, a, "constant", c).tolist() == [c] * 4
    assert huber_threshold(t, a, "exponential", c).tolist() == pytest.approx([c ** (k / 1000) for k in t.tolist()])
    snr = huber_threshold(t, a, "snr", c)
    for value, k in zip(snr.tolist(), t.tolist()):
        ab = a[k].item()
        sigma = math.sqrt((1 - ab) / ab) if ab > 0 else math.inf
        assert value == pytest.approx((1 - c) / (1 + sigma) ** 2 + c)
    assert snr[-1].item() == pytest.approx(c)  # zero terminal SNR: sigma = inf, exactly c
    assert bool((snr[:-1] > snr[1:]).all())  # from ~1 at low noise down to c
    with pytest.raises(ValueError, match="huber_schedule"):
        huber_threshold(t, a, "linear", c)


def test_loss_type_per_sample_is_the_mean_of_its_elements() -> None:
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500, 990])
    spec = LossType("smooth_l1", "exponential", 0.2)
    c = huber_threshold(timesteps, schedule.alphas_cumprod, "exponential", 0.2)
    r = (prediction - target).double()
    expected = (2 * ((r.pow(2) + c.view(-1, 1, 1, 1) ** 2).sqrt() - c.view(-1, 1, 1, 1))).flatten(1).mean(1)
    assert torch.allclose(spec.per_sample(prediction, target, timesteps, schedule.alphas_cumprod).double(), expected,
                          rtol=1e-5)
    l2 = LossType().per_sample(prediction, target, timesteps, schedule.alphas_cumprod)
    assert torch.allclose(l2, (prediction - target).pow(2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="loss_type"):
        LossType("l1")
