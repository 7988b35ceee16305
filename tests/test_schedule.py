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


# ---- the whole of what is read and written (docs/testing.md: mutation testing) -----------------------

OTHER = {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear",
         "prediction_type": "sample", "rescale_betas_zero_snr": True}


def test_every_field_of_the_model_config_is_read_and_a_missing_one_takes_sdxls() -> None:
    read = NoiseSchedule.from_scheduler_config(OTHER)
    assert (read.num_train_timesteps, read.beta_start, read.beta_end, read.beta_schedule, read.prediction_type,
            read.rescale_betas_zero_snr) == (500, 0.001, 0.02, "linear", "sample", True)
    assert read.alphas_cumprod.shape == (500,) and read.alphas_cumprod[-1].item() == 0.0
    assert NoiseSchedule.from_scheduler_config({}) == NoiseSchedule()
    assert torch.equal(NoiseSchedule.from_scheduler_config({}).alphas_cumprod, NoiseSchedule().alphas_cumprod)
    assert NoiseSchedule.from_scheduler_config(OTHER, beta_schedule=None, training_timestep_spacing="leading") == \
        NoiseSchedule(**OTHER, training_timestep_spacing="leading")


def test_the_written_scheduler_config_and_expert_description_hold_every_field() -> None:
    schedule = NoiseSchedule(**OTHER, training_timestep_spacing="leading", inference_timestep_spacing="linspace")
    assert schedule.scheduler_config({"_class_name": "X", "steps_offset": 1, "prediction_type": "epsilon"}) == {
        "steps_offset": 1, "num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear",
        "prediction_type": "sample", "rescale_betas_zero_snr": True, "timestep_spacing": "linspace"}
    assert schedule.describe() == {
        "num_train_timesteps": 500, "prediction_type": "sample", "rescale_betas_zero_snr": True,
        "timestep_spacing": "linspace", "training_timestep_spacing": "leading", "beta_schedule": "linear",
        "beta_start": 0.001, "beta_end": 0.02}


def test_warnings_name_each_bad_combination_and_its_fix() -> None:
    epsilon = ("rescale_betas_zero_snr with prediction_type=epsilon: the final step has SNR 0 and an epsilon target "
               "carries no signal there; use --prediction_type=v_prediction or sample")
    spacing = ("rescale_betas_zero_snr with inference spacing 'leading': sampling will not start at the zero-SNR "
               "step; use --inference_scheduler_timestep_spacing=trailing")
    assert NoiseSchedule(rescale_betas_zero_snr=True, inference_timestep_spacing="leading").warnings() == \
        [epsilon, spacing]
    assert NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="v_prediction").warnings() == []
    assert NoiseSchedule(inference_timestep_spacing="leading").warnings() == []


def test_betas_of_both_schedules_and_the_refusals() -> None:
    linear = make_betas(5, 0.1, 0.5, "linear")
    assert linear.dtype == torch.float32 and linear.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    scaled = make_betas(3, 0.04, 0.16)
    assert scaled.dtype == torch.float32 and scaled.tolist() == pytest.approx([0.04, 0.09, 0.16])
    assert torch.equal(NoiseSchedule(**{**OTHER, "rescale_betas_zero_snr": False}).alphas_cumprod,
                       alphas_cumprod_from_betas(make_betas(500, 0.001, 0.02, "linear")))
    with pytest.raises(ValueError, match=r"^beta_schedule 'cosine' is not supported \(use scaled_linear or linear\)$"):
        make_betas(10, beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"^prediction_type 'flow' is not one of \('epsilon', 'v_prediction', "):
        NoiseSchedule(prediction_type="flow")


def test_inference_timesteps_at_their_edges() -> None:
    assert inference_timesteps(10, 3, "leading") == [6, 3, 0]  # no offset unless given
    assert inference_timesteps(10, 1, "linspace") == [0]
    assert inference_timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))
    with pytest.raises(ValueError, match=r"^timestep spacing 'x' is not one of \('leading', 'linspace', 'trailing'\)$"):
        inference_timesteps(10, 3, "x")


def test_noising_and_targets_keep_the_latents_dtype() -> None:
    schedule = NoiseSchedule()
    x0 = torch.ones(2, 4, 2, 2, dtype=torch.bfloat16)
    t = torch.tensor([10, 900])
    assert add_noise(x0, x0, t, schedule.alphas_cumprod).dtype == torch.bfloat16
    assert training_target(x0, x0, t, schedule.alphas_cumprod, "v_prediction").dtype == torch.bfloat16


def test_betas_are_float32_whatever_the_default_dtype() -> None:
    """diffusers computes its betas in float32; a float64 default dtype must not change the schedule."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert make_betas(3).dtype == torch.float32
        assert make_betas(3, 0.1, 0.2, "linear").dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


def test_linspace_with_two_steps_visits_both_ends() -> None:
    assert inference_timesteps(10, 2, "linspace") == [9, 0]
