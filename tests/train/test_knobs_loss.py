"""Issue 23's loss types and timestep distributions through the training loss, the config and the loop's reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.losses import LossType, huber_threshold
from expertune.schedule import NoiseSchedule
from expertune.timestep_dist import TimestepDistribution
from expertune.train.knobs import distribution_for, loss_type_for
from expertune.objective.loss import TrainingBatch, denoising_loss, draw_randomness
from expertune.objective.weighting import WeightTable


def test_huber_loss_with_min_snr_weights_matches_the_closed_form(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    batch = TrainingBatch(latents=torch.randn(3, 4, 8, 8, generator=g), prompt_embeds=torch.randn(3, 77, 48, generator=g),
                          pooled_embeds=torch.randn(3, 32, generator=g),
                          time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * 3, dtype=torch.float32))
    schedule = NoiseSchedule(prediction_type="epsilon")
    weights = WeightTable.build(schedule.alphas_cumprod, "min_snr", "epsilon", 5.0)
    band = ExpertBand(0, 999)
    distribution = TimestepDistribution(bias_strategy="later", bias_multiplier=4.0)
    draws = draw_randomness(band, torch.Generator().manual_seed(3), 3, (4, 8, 8), distribution=distribution)
    spec = LossType("huber", "snr", 0.1)
    out = denoising_loss(unet, batch, schedule, draws, weights=weights, loss_type=spec)
    with torch.no_grad():
        t = draws.timesteps
        ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * batch.latents + (1 - ab).sqrt() * draws.noise
        prediction = unet(noisy, t, encoder_hidden_states=batch.prompt_embeds,
                          added_cond_kwargs={"text_embeds": batch.pooled_embeds, "time_ids": batch.time_ids}).sample
    c = huber_threshold(t, schedule.alphas_cumprod, "snr", 0.1).float().view(-1, 1, 1, 1)
    per_sample = (2 * c * (((prediction - draws.noise) ** 2 + c * c).sqrt() - c)).flatten(1).mean(1)
    expected = (per_sample * weights.for_timesteps(t)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = denoising_loss(unet, batch, schedule, draws, weights=weights)  # what the evaluation scores: MSE
    assert plain.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


def test_the_loop_reads_the_knobs_from_the_config() -> None:
    config, _ = load_config(["--loss_type=pseudo_huber", "--huber_schedule=constant", "--huber_c=0.3",
                             "--timestep_distribution=logit_normal", "--logit_mean=-0.5", "--logit_std=1.5",
                             "--timestep_bias_strategy=range", "--timestep_bias_begin=100",
                             "--timestep_bias_end=300", "--timestep_bias_multiplier=2"], find_config=False)
    assert loss_type_for(config) == LossType("huber", "constant", 0.3)
    assert distribution_for(config) == TimestepDistribution("logit_normal", -0.5, 1.5, "range", 2.0, 100, 300, 0.25)


def test_bad_knob_values_are_refused_before_any_model_loads() -> None:
    with pytest.raises(ConfigError, match="timestep_bias_begin"):
        load_config(["--timestep_bias_strategy=range", "--timestep_bias_begin=500", "--timestep_bias_end=400"],
                    find_config=False)
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(["--loss_type=l1"], find_config=False)
    with pytest.raises(ConfigError, match="huber_c"):
        load_config(["--huber_c=0"], find_config=False)


def test_expert_json_records_the_knobs(tmp_path: Path) -> None:
    from expertune.expert_format import ExpertDescription
    from expertune.train.knobs import knobs_summary

    plain, _ = load_config([], find_config=False)
    assert knobs_summary(plain) == {}  # plain training adds nothing to expert.json
    config, _ = load_config(["--loss_type=huber", "--timestep_bias_strategy=later", "--timestep_bias_multiplier=2",
                             "--flip_images", "--model_type=lora", "--use_dora", "--lora_rank=8"], find_config=False)
    summary = knobs_summary(config)
    assert summary == {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1,
                       "timestep_distribution": "uniform, bias x2 on the last 0.25", "flip_images": True,
                       "adapter": "dora", "rank": 8, "alpha": 8}
    ExpertDescription(ExpertBand(0, 349), {"prediction_type": "epsilon", "num_train_timesteps": 1000},
                      model_type="lora", training=summary).write(tmp_path)
    again = ExpertDescription.read(tmp_path)
    assert again.training == summary and "training" not in again.parameterisation


def test_input_perturbation_strength_decays_like_simpletuners() -> None:
    from expertune.objective.loss import input_perturbation_strength

    assert input_perturbation_strength(0.1, 0, 0) == input_perturbation_strength(0.1, 0, 10_000) == 0.1
    assert [input_perturbation_strength(0.1, 4, s) for s in range(6)] == pytest.approx([0.1, 0.075, 0.05, 0.025, 0, 0])
    assert input_perturbation_strength(0.0, 4, 0) == 0.0


def test_input_perturbation_noises_the_input_not_the_target(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    batch = TrainingBatch(latents=torch.randn(2, 4, 8, 8, generator=g), prompt_embeds=torch.randn(2, 77, 48, generator=g),
                          pooled_embeds=torch.randn(2, 32, generator=g),
                          time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32))
    schedule = NoiseSchedule(prediction_type="epsilon")
    band = ExpertBand(0, 999)
    plain = draw_randomness(band, torch.Generator().manual_seed(3), 2, (4, 8, 8))
    draws = draw_randomness(band, torch.Generator().manual_seed(3), 2, (4, 8, 8), input_perturbation=0.1)
    assert plain.input_noise is None and torch.equal(draws.noise, plain.noise)  # the same stream up to the extra draw
    replay = torch.Generator().manual_seed(3)
    replay_t = torch.randint(0, 1000, (2,), generator=replay)
    replay_noise = torch.randn(2, 4, 8, 8, generator=replay)
    torch.rand(2, generator=replay)  # caption dropout
    expected_input = replay_noise + 0.1 * torch.randn(2, 4, 8, 8, generator=replay)
    assert torch.equal(draws.timesteps, replay_t) and torch.equal(draws.input_noise, expected_input)
    assert torch.equal(draws.for_rank(1, 2).input_noise, expected_input[1:])
    out = denoising_loss(unet, batch, schedule, draws)
    with torch.no_grad():
        ab = schedule.alphas_cumprod[replay_t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * batch.latents + (1 - ab).sqrt() * expected_input
        prediction = unet(noisy, replay_t, encoder_hidden_states=batch.prompt_embeds,
                          added_cond_kwargs={"text_embeds": batch.pooled_embeds, "time_ids": batch.time_ids}).sample
    assert out.loss.item() == pytest.approx((prediction - replay_noise).pow(2).mean().item(), rel=1e-5)


def test_masked_loss_weights_each_latent_element(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :, :4] = 1.0
    batch = TrainingBatch(latents=torch.randn(2, 4, 8, 8, generator=g), prompt_embeds=torch.randn(2, 77, 48, generator=g),
                          pooled_embeds=torch.randn(2, 32, generator=g),
                          time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32), masks=masks)
    schedule = NoiseSchedule(prediction_type="epsilon")
    draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(3), 2, (4, 8, 8))
    weights = WeightTable.build(schedule.alphas_cumprod, "min_snr", "epsilon", 5.0)
    masked = denoising_loss(unet, batch, schedule, draws, weights=weights, use_masks=True)
    whole = denoising_loss(unet, batch, schedule, draws, weights=weights)  # use_masks off: the whole image
    with torch.no_grad():
        t = draws.timesteps
        ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * batch.latents + (1 - ab).sqrt() * draws.noise
        prediction = unet(noisy, t, encoder_hidden_states=batch.prompt_embeds,
                          added_cond_kwargs={"text_embeds": batch.pooled_embeds, "time_ids": batch.time_ids}).sample
    squared = (prediction - draws.noise) ** 2
    w = weights.for_timesteps(t)
    assert masked.loss.item() == pytest.approx(((squared * masks).flatten(1).mean(1) * w).mean().item(), rel=1e-5)
    assert whole.loss.item() == pytest.approx((squared.flatten(1).mean(1) * w).mean().item(), rel=1e-5)
    ones = TrainingBatch(batch.latents, batch.prompt_embeds, batch.pooled_embeds, batch.time_ids, torch.ones_like(masks))
    assert denoising_loss(unet, ones, schedule, draws, weights=weights, use_masks=True).loss.item() == \
        pytest.approx(whole.loss.item(), rel=1e-5)
    # masked_loss_probability: one draw per micro-batch, only when the batch has masks
    assert draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(3), 2, (4, 8, 8)).use_masks
    uses = [draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(s), 2, (4, 8, 8),
                            masked_loss_probability=0.5).use_masks for s in range(200)]
    assert 70 < sum(uses) < 130
