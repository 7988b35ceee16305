from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from expertune.schedule import (
    NoiseSchedule,
    add_noise,
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    signal_to_noise_ratio,
    training_target,
)

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize(
    "t, snr_sdxl, snr_zero_terminal",
    [(0, 1175.5, 1175.5), (200, 3.06, 2.80), (350, 1.03, 0.91), (650, 0.133, 0.095), (999, 0.0047, 0.0)],
)
def test_snr_table_of_reference(t: int, snr_sdxl: float, snr_zero_terminal: float) -> None:
    plain = signal_to_noise_ratio(NoiseSchedule().alphas_cumprod)
    rescaled = signal_to_noise_ratio(NoiseSchedule(rescale_betas_zero_snr=True).alphas_cumprod)
    assert plain[t].item() == pytest.approx(snr_sdxl, rel=0.02, abs=1e-4)
    assert rescaled[t].item() == pytest.approx(snr_zero_terminal, rel=0.02, abs=1e-6)


def test_zero_terminal_rescale_follows_algorithm_1() -> None:
    betas = make_betas(1000)
    rescaled = rescale_zero_terminal_snr(betas)
    before = alphas_cumprod_from_betas(betas).sqrt()
    after = alphas_cumprod_from_betas(rescaled).sqrt()
    assert rescaled[-1].item() == pytest.approx(1.0)  # beta_T = 1
    assert after[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    # An affine map of sqrt(alpha_bar): (a - aT) * a0 / (a0 - aT).
    a0, aT = before[0], before[-1]
    torch.testing.assert_close(after, (before - aT) * a0 / (a0 - aT), rtol=1e-4, atol=1e-6)
    # ... and identical to diffusers' own implementation.
    reference = DDPMScheduler(**SDXL, rescale_betas_zero_snr=True)
    torch.testing.assert_close(NoiseSchedule(rescale_betas_zero_snr=True).alphas_cumprod, reference.alphas_cumprod)


def test_targets_match_the_formulas_and_diffusers() -> None:
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 350, 999])
    ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = training_target(x0, noise, t, schedule.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    # At zero terminal SNR the v target is -x0: all signal must come from the prediction.
    torch.testing.assert_close(v[2], -x0[2], atol=1e-5, rtol=0)
    reference = DDPMScheduler(**SDXL, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    torch.testing.assert_close(v, reference.get_velocity(x0, noise, t))
    torch.testing.assert_close(add_noise(x0, noise, t, schedule.alphas_cumprod), reference.add_noise(x0, noise, t))
    assert torch.equal(training_target(x0, noise, t, schedule.alphas_cumprod, "epsilon"), noise)
    assert torch.equal(training_target(x0, noise, t, schedule.alphas_cumprod, "sample"), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x0, noise, t, schedule.alphas_cumprod, "flow")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [20, 30, 40, 50])
def test_inference_timesteps_match_diffusers(spacing: str, steps: int) -> None:
    scheduler = EulerDiscreteScheduler(**SDXL, timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(steps)
    ours = inference_timesteps(1000, steps, spacing, steps_offset=1)
    assert ours == [round(float(t)) for t in scheduler.timesteps]


def test_trailing_always_starts_at_the_last_step() -> None:
    for steps in (1, 7, 20, 33, 1000):
        assert inference_timesteps(1000, steps, "trailing")[0] == 999


def test_schedule_reads_the_model_config_and_writes_what_was_trained() -> None:
    pretrained = dict(SDXL, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, _class_name="X")
    schedule = NoiseSchedule.from_scheduler_config(
        pretrained, prediction_type="v_prediction", rescale_betas_zero_snr=True, inference_timestep_spacing="trailing"
    )
    kept = NoiseSchedule.from_scheduler_config(pretrained, prediction_type=None)
    assert kept.prediction_type == "epsilon"
    saved = schedule.scheduler_config(pretrained)
    assert saved["prediction_type"] == "v_prediction"
    assert saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"
    assert "_class_name" not in saved and saved["steps_offset"] == 1
    assert any("zero" in w for w in NoiseSchedule(rescale_betas_zero_snr=True).warnings())
    assert schedule.warnings() == []
