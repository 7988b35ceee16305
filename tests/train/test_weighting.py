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


# ---- pinned whole (docs/testing.md: mutation testing) ------------------------------------------------

def test_weighted_mse_is_the_mean_of_weighted_per_sample_squared_errors() -> None:
    prediction = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # per-sample MSE: (1 + 4) / 2 = 2.5 and (1 + 4) / 2 = 2.5
    target[1, 1] = 2.0  # second sample: (1 + 9) / 2 = 5
    assert weighted_mse(prediction, target, None).item() == pytest.approx(3.75)
    weighted = weighted_mse(prediction, target, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert weighted.dtype == torch.float32 and weighted.item() == pytest.approx((2.5 * 0.5 + 5 * 2.0) / 2)


def test_min_snr_needs_a_positive_gamma_and_unknown_names_are_refused() -> None:
    for gamma in (None, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"^min_snr needs gamma > 0$"):
            epsilon_weights(SNRS, "min_snr", gamma)
    assert epsilon_weights(torch.tensor([0.25, 1.0]), "min_snr", 0.5).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"^loss weighting 'p2' is not one of \('none', 'min_snr', 'debiased'\)$"):
        epsilon_weights(SNRS, "p2")
    with pytest.raises(ValueError, match=r"^prediction_type 'flow' is not epsilon, v_prediction or sample$"):
        loss_weights(SNRS, "min_snr", "flow", 5.0)


def test_a_weight_table_keeps_what_it_was_built_for_and_weights_each_timestep() -> None:
    alphas = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)  # SNR inf, 1, 0.25, 0
    table = WeightTable.build(alphas, "min_snr", "v_prediction", 0.5)
    assert (table.weighting, table.prediction_type, table.gamma, table.active) == ("min_snr", "v_prediction", 0.5, True)
    # w_eps = min(SNR, 0.5) / SNR, times SNR / (SNR + 1): 0.5 / (SNR + 1) above 0.5, SNR / (SNR + 1) below
    assert table.weights.tolist() == pytest.approx([0.0, 0.25, 0.2, 0.0])
    assert table.for_timesteps(torch.tensor([2, 1, 2])).tolist() == pytest.approx([0.2, 0.25, 0.2])
    assert not WeightTable.build(alphas, "none", "epsilon").active


def test_band_summary_rounds_to_six_places_over_the_inclusive_band() -> None:
    table = WeightTable("debiased", "sample", None, torch.tensor([0.0, 1 / 3, 2 / 3, 0.0, 5.0], dtype=torch.float32))
    assert table.band_summary(0, 3) == {"weighting": "debiased", "prediction_type": "sample", "snr_gamma": None,
                                        "mean": 0.25, "min": 0.0, "max": 0.666667, "zero_weight_timesteps": [0, 3]}
    assert table.band_summary(1, 2)["mean"] == 0.5 and table.band_summary(1, 2)["min"] == 0.333333
    assert table.band_summary(1, 1)["mean"] == 0.333333


def test_starvation_names_the_mean_the_zero_timesteps_and_the_fix() -> None:
    four_zeros = WeightTable("min_snr", "v_prediction", 5.0, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.2]))
    assert four_zeros.starvation(0, 5) == (
        "loss weighting min_snr (v_prediction) starves the band [0, 5]: its mean weight over the band is 0.2 (the "
        "band trains at about 20% of the unweighted step size); timestep(s) 0, 1, 2 ... get weight 0 and are not "
        "trained at all. Consider --loss_weighting=none for this expert")
    three_zeros = WeightTable("min_snr", "epsilon", 5.0, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert three_zeros.starvation(0, 5) == (
        "loss weighting min_snr (epsilon) starves the band [0, 5]: timestep(s) 0, 1, 2 get weight 0 and are not "
        "trained at all. Consider a larger --snr_gamma or --loss_weighting=none for this expert")
    at_the_limit = WeightTable("debiased", "epsilon", None, torch.tensor([0.25, 0.25]))
    assert at_the_limit.starvation(0, 1) is None
    assert WeightTable("none", "epsilon", None, torch.zeros(3)).starvation(0, 2) is None


def test_weights_follow_the_timesteps_and_the_predictions_to_their_device() -> None:
    """`meta` stands in for an accelerator: a weight left on the CPU cannot meet a prediction there."""
    table = WeightTable.build(NoiseSchedule().alphas_cumprod, "min_snr", "epsilon", 5.0)
    assert table.for_timesteps(torch.tensor([3, 700], device="meta")).device.type == "meta"
    prediction = torch.zeros(2, 4, device="meta")
    assert weighted_mse(prediction, prediction, torch.tensor([1.0, 0.5])).device.type == "meta"
