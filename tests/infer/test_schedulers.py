"""Sampler choice at inference: the parameterisation carries over, and the hand-off tiles the schedule."""

from __future__ import annotations

import pytest

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand
from expertune.infer import schedulers
from expertune.infer.schedulers import SCHEDULER_CLASSES, handoff_timesteps, scheduler_from_saved
from expertune.models.tiny import tiny_scheduler_config
from expertune.schedule import NoiseSchedule, inference_timesteps

SDXL = tiny_scheduler_config() | {"_class_name": "EulerDiscreteScheduler"}
V_ZSNR = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True).scheduler_config(SDXL)
STAGE_1, STAGE_2 = ExpertBand(350, 999), ExpertBand(0, 349)


@pytest.mark.parametrize("choice", sorted(SCHEDULER_CLASSES))
def test_each_choice_keeps_the_saved_parameterisation(choice: str) -> None:
    scheduler = scheduler_from_saved(choice, V_ZSNR)
    assert type(scheduler).__name__ == SCHEDULER_CLASSES[choice]
    for key in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "num_train_timesteps",
                "beta_schedule", "beta_start", "beta_end"):
        assert scheduler.config[key] == V_ZSNR[key], key
    assert scheduler.order == 1  # none needs diffusers' extra step for order-2 samplers


@pytest.mark.parametrize("choice", sorted(SCHEDULER_CLASSES))
@pytest.mark.parametrize("config", [V_ZSNR, SDXL], ids=["v-zsnr-trailing", "sdxl-leading"])
@pytest.mark.parametrize("steps", [4, 6, 20, 30, 40, 50])
def test_each_inference_timestep_runs_once_in_the_expert_that_owns_it(choice, config, steps) -> None:
    scheduler = scheduler_from_saved(choice, config)
    high, low = handoff_timesteps(scheduler, steps, STAGE_1), handoff_timesteps(scheduler, steps, STAGE_2)
    scheduler.set_timesteps(steps)
    assert high + low == [int(t) for t in scheduler.timesteps]
    assert all(350 <= t <= 999 for t in high) and all(0 <= t <= 349 for t in low)


def test_hand_off_counts_of_the_reference() -> None:
    """REFERENCE §1, trailing spacing: 20 → 13 + 7, 30 → 20 + 10, 40 → 26 + 14 (first refiner t 349), 50 → 33 + 17."""
    scheduler = scheduler_from_saved("euler", V_ZSNR)
    for steps, (base, refiner) in {20: (13, 7), 30: (20, 10), 40: (26, 14), 50: (33, 17)}.items():
        high, low = handoff_timesteps(scheduler, steps, STAGE_1), handoff_timesteps(scheduler, steps, STAGE_2)
        assert (len(high), len(low)) == (base, refiner)
        assert high + low == inference_timesteps(1000, steps, "trailing")
    assert handoff_timesteps(scheduler, 40, STAGE_2)[0] == 349


def test_an_order_2_sampler_gets_diffusers_extra_step_at_the_hand_off() -> None:
    """Heun visits each timestep but the first twice: the later expert takes one more entry when its count is
    even, so the cut never falls between the two halves of a step (diffusers issue 5447)."""
    import diffusers

    heun = diffusers.HeunDiscreteScheduler.from_config(SDXL | {"timestep_spacing": "trailing"})
    low = handoff_timesteps(heun, 20, STAGE_2)
    all_timesteps = [int(t) for t in heun.timesteps]
    below = sum(t < 350 for t in all_timesteps)
    assert below % 2 == 0 and len(low) == below + 1 and low == all_timesteps[-len(low):]


def test_unknown_choice_and_a_class_that_would_drop_the_parameterisation(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="--scheduler 'heun' is not one of: saved, "):
        scheduler_from_saved("heun", V_ZSNR)
    # PNDM has no zero-SNR option; diffusers would keep the key in its config and silently ignore it.
    monkeypatch.setitem(schedulers.SCHEDULER_CLASSES, "pndm", "PNDMScheduler")
    with pytest.raises(ModelError, match=r"pndm does not keep rescale_betas_zero_snr of stage2: saved True, "
                                         r"PNDMScheduler has 'no such option'"):
        scheduler_from_saved("pndm", V_ZSNR, "stage2")
    assert scheduler_from_saved("pndm", SDXL).config.prediction_type == "epsilon"  # nothing to lose: fine
    assert scheduler_from_saved("saved", V_ZSNR) is V_ZSNR
