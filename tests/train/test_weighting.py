"""Loss weights against their formulas, at SNR = 0 (zero terminal SNR) and on the REFERENCE numbers."""

from __future__ import annotations

import pytest
import torch

from expertune.schedule import NoiseSchedule, signal_to_noise_ratio
from expertune.objective.weighting import (
    WeightTable,
    epsilon_weights,
    loss_weights,
    resolve_weighting,
    weighted_mse,
)

SNRS = torch.tensor([0.0, 1e-4, 0.0047, 0.5, 1.0, 3.06, 5.0, 7.0, 1175.5], dtype=torch.float64)


def test_min_snr_follows_hang_et_al_per_prediction_type() -> None:
    gamma = 5.0
    positive = SNRS[1:]
    clipped = torch.minimum(positive, torch.tensor(gamma, dtype=torch.float64))
    eps = loss_weights(positive, "min_snr", "epsilon", gamma)
    assert torch.allclose(eps, clipped / positive)
    assert torch.allclose(loss_weights(positive, "min_snr", "v_prediction", gamma), clipped / (positive + 1))
    assert torch.allclose(loss_weights(positive, "min_snr", "sample", gamma), clipped)


def test_debiased_is_one_over_sqrt_snr_on_the_epsilon_loss_carried_to_v_and_x0() -> None:
    positive = SNRS[2:-1]  # inside the clamp [1e-3, 1e3]
    eps = loss_weights(positive, "debiased", "epsilon")
    assert torch.allclose(eps, 1 / positive.sqrt())
    assert torch.allclose(loss_weights(positive, "debiased", "v_prediction"), positive.sqrt() / (positive + 1))
    assert torch.allclose(loss_weights(positive, "debiased", "sample"), positive.sqrt())
    # clamped outside [1e-3, 1e3]: finite at both ends
    assert epsilon_weights(torch.tensor([0.0, 1e6]), "debiased").tolist() == pytest.approx([1000 ** 0.5, 1000 ** -0.5])


@pytest.mark.parametrize("weighting, gamma", [("none", None), ("min_snr", 5.0), ("debiased", None)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_weight_is_finite_including_snr_zero_and_infinity(weighting, gamma, prediction_type) -> None:
    snr = torch.cat([SNRS, torch.tensor([float("inf")], dtype=torch.float64)])
    weights = loss_weights(snr, weighting, prediction_type, gamma)
    assert bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())


def test_the_defined_values_at_snr_zero() -> None:
    zero = torch.zeros(1, dtype=torch.float64)
    # ε: min(SNR, γ)/SNR is 0/0; its limit is 1 (below γ the weight is exactly 1)
    assert loss_weights(zero, "min_snr", "epsilon", 5.0).item() == 1.0
    # v and x0: min(SNR, γ)/(SNR + 1) and min(SNR, γ) are 0: the step is not trained
    assert loss_weights(zero, "min_snr", "v_prediction", 5.0).item() == 0.0
    assert loss_weights(zero, "min_snr", "sample", 5.0).item() == 0.0
    assert loss_weights(zero, "debiased", "epsilon").item() == pytest.approx(1000 ** 0.5)
    assert loss_weights(zero, "debiased", "v_prediction").item() == 0.0
    assert loss_weights(zero, "none", "v_prediction").item() == 1.0


def test_reference_numbers_for_v_prediction_under_zero_terminal_snr() -> None:
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    table = WeightTable.build(schedule.alphas_cumprod, "min_snr", "v_prediction", 5.0)
    assert float(signal_to_noise_ratio(schedule.alphas_cumprod)[999]) == 0.0
    assert table.weights[999].item() == 0.0
    high, low = table.band_summary(350, 999), table.band_summary(0, 349)
    assert high["mean"] == pytest.approx(0.13, abs=0.01) and low["mean"] == pytest.approx(0.55, abs=0.01)
    assert high["zero_weight_timesteps"] == [999] and low["zero_weight_timesteps"] == []
    warning = table.starvation(350, 999)
    assert warning and "999" in warning and "0.13" in warning and "--loss_weighting=none" in warning
    assert table.starvation(0, 349) is None
    # the same run unweighted, or ε-prediction min-SNR on the high band, starves nothing
    assert WeightTable.build(schedule.alphas_cumprod, "none", "v_prediction").starvation(350, 999) is None
    eps = WeightTable.build(NoiseSchedule().alphas_cumprod, "min_snr", "epsilon", 5.0)
    assert eps.band_summary(350, 999)["mean"] == 1.0 and eps.starvation(350, 999) is None


def test_resolve_weighting() -> None:
    assert resolve_weighting(None, None) == "none"
    assert resolve_weighting(None, 5.0) == "min_snr"
    assert resolve_weighting("debiased", None) == "debiased"


def test_weighted_mse_weights_each_sample() -> None:
    prediction, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 2  # per-sample MSE: 1 and 4
    assert weighted_mse(prediction, target, None).item() == pytest.approx(2.5)
    assert weighted_mse(prediction, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert weighted_mse(prediction, target, torch.tensor([0.5, 0.25])).item() == pytest.approx((0.5 + 1.0) / 2)
