from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expertune.experts import ExpertBand
from expertune.schedule import NoiseSchedule
from expertune.objective.loss import TrainingBatch, denoising_loss, draw_randomness
from expertune.train.optim import build_lr_scheduler, build_optimizer


def test_loss_is_mse_against_the_v_target_inside_the_band(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    batch = TrainingBatch(
        latents=torch.randn(2, 4, 8, 8, generator=g),
        prompt_embeds=torch.randn(2, 77, 48, generator=g),
        pooled_embeds=torch.randn(2, 32, generator=g),
        time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32),
    )
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    band = ExpertBand(350, 999)
    draws = draw_randomness(band, torch.Generator().manual_seed(5), 2, (4, 8, 8))
    out = denoising_loss(unet, batch, schedule, draws)
    assert bool(band.contains(out.timesteps).all())

    # Recompute by hand from the same random stream: t first, then ε.
    replay = torch.Generator().manual_seed(5)
    t = torch.randint(350, 1000, (2,), generator=replay)
    noise = torch.randn(batch.latents.shape, generator=replay)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * batch.latents + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * batch.latents
    with torch.no_grad():
        prediction = unet(noisy, t, encoder_hidden_states=batch.prompt_embeds,
                          added_cond_kwargs={"text_embeds": batch.pooled_embeds, "time_ids": batch.time_ids}).sample
    assert torch.equal(out.timesteps, t)
    assert out.loss.item() == pytest.approx(torch.mean((prediction - target) ** 2).item(), rel=1e-5)
    out.loss.backward()
    assert unet.conv_in.weight.grad is not None


def _train_section(**overrides):
    values = dict(optimizer="adamw", learning_rate=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                  adam_epsilon=1e-8, lr_scheduler="constant", lr_warmup_steps=0, lr_end=0.1, lr_power=1.0,
                  lr_num_cycles=1)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5]),
        ("cosine", [0.0, 0.5, 1.0, 0.5]),
        ("polynomial", [0.0, 0.5, 1.0, 0.55]),  # linear decay (power 1) from 1.0 to lr_end 0.1
    ],
)
def test_lr_schedules_warm_up_then_follow_their_shape(name: str, expected: list[float]) -> None:
    section = _train_section(lr_scheduler=name, lr_warmup_steps=0 if name == "constant" else 2)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    scheduler = build_lr_scheduler(optimizer, section, total_steps=4)
    values = [scheduler.get_last_lr()[0]]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    assert values == pytest.approx(expected, abs=1e-6)




def test_rank_slices_of_one_global_draw_equal_the_single_process_draw() -> None:
    band = ExpertBand(0, 349)
    single = draw_randomness(band, torch.Generator().manual_seed(1), 6, (4, 2, 2), caption_dropout=0.5,
                             stratified=True)
    ranks = [draw_randomness(band, torch.Generator().manual_seed(1), 6, (4, 2, 2), caption_dropout=0.5,
                             stratified=True).for_rank(r, 2) for r in range(2)]
    for r, part in enumerate(ranks):
        assert torch.equal(part.timesteps, single.timesteps[r::2])
        assert torch.equal(part.noise, single.noise[r::2])
        assert torch.equal(part.keep_caption, single.keep_caption[r::2])
    assert bool(band.contains(single.timesteps).all())


# ---- the weighted loss against the hand-computed weighted MSE ----------------------------------------

class _ShiftUNet(torch.nn.Module):
    """A stand-in denoiser with the UNet's call signature: the noisy input plus a shift that depends on every
    conditioning tensor, computed in the dtype it is fed (so a cast, or a dropped input, changes the loss)."""

    def forward(self, noisy, timesteps, *, encoder_hidden_states, added_cond_kwargs, return_dict):
        shift = (encoder_hidden_states.mean(dim=(1, 2)) + added_cond_kwargs["text_embeds"].mean(dim=1)
                 + added_cond_kwargs["time_ids"].mean(dim=1) / 64)  # per sample, in the conditioning's dtype
        return (noisy * 0.5 + shift.view(-1, 1, 1, 1) + timesteps.to(noisy.dtype).view(-1, 1, 1, 1) / 1000,)


def _batch() -> TrainingBatch:
    g = torch.Generator().manual_seed(1)
    return TrainingBatch(latents=torch.randn(3, 4, 4, 4, generator=g), prompt_embeds=torch.randn(3, 7, 8, generator=g),
                         pooled_embeds=torch.randn(3, 5, generator=g),
                         time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 3))


def _by_hand(batch: TrainingBatch, schedule: NoiseSchedule, draws, weights: torch.Tensor | None,
             dtype: torch.dtype = torch.float32) -> float:
    t = draws.timesteps
    x0 = batch.latents
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
    noise = draws.noise.to(x0.dtype)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    cast = batch.to("cpu", dtype)
    prediction = _ShiftUNet()(noisy.to(dtype), t, encoder_hidden_states=cast.prompt_embeds,
                              added_cond_kwargs={"text_embeds": cast.pooled_embeds, "time_ids": cast.time_ids},
                              return_dict=False)[0].float()
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    return float(per_sample.mean() if weights is None else (per_sample * weights).mean())


def test_a_weighted_loss_is_the_hand_computed_weighted_mse() -> None:
    from expertune.objective.weighting import WeightTable

    schedule = NoiseSchedule(prediction_type="v_prediction")
    batch = _batch()
    draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(2), 3, (4, 4, 4))
    table = WeightTable.build(schedule.alphas_cumprod, "min_snr", "v_prediction", 5.0)
    snr = schedule.alphas_cumprod[draws.timesteps].double()
    snr = snr / (1 - snr)
    weights = (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)).float()  # Hang et al., v
    assert table.for_timesteps(draws.timesteps).tolist() == pytest.approx(weights.tolist(), rel=1e-6)
    assert not torch.allclose(weights, torch.ones(3))  # the weights differ from 1, so weighting is observable
    weighted = denoising_loss(_ShiftUNet(), batch, schedule, draws, weights=table)
    assert weighted.loss.item() == pytest.approx(_by_hand(batch, schedule, draws, weights), rel=1e-5)
    plain = denoising_loss(_ShiftUNet(), batch, schedule, draws)
    assert plain.loss.item() == pytest.approx(_by_hand(batch, schedule, draws, None), rel=1e-5)
    assert weighted.loss.item() != pytest.approx(plain.loss.item(), rel=1e-3)
    inactive = WeightTable.build(schedule.alphas_cumprod, "none", "v_prediction")
    assert denoising_loss(_ShiftUNet(), batch, schedule, draws, weights=inactive).loss.item() == plain.loss.item()
    assert torch.equal(weighted.timesteps, draws.timesteps)


def test_a_model_dtype_casts_what_the_unet_gets_and_nothing_else() -> None:
    schedule = NoiseSchedule(prediction_type="v_prediction")
    batch = _batch()
    draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(2), 3, (4, 4, 4))
    out = denoising_loss(_ShiftUNet(), batch, schedule, draws, model_dtype=torch.bfloat16)
    by_hand = _by_hand(batch, schedule, draws, None, torch.bfloat16)
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert out.loss.item() != pytest.approx(_by_hand(batch, schedule, draws, None), rel=1e-4)


def test_draws_come_in_order_from_one_generator() -> None:
    band = ExpertBand(0, 999)
    draws = draw_randomness(band, torch.Generator().manual_seed(4), 6, (2, 3), caption_dropout=0.5, stratified=True)
    replay = torch.Generator().manual_seed(4)
    assert torch.equal(draws.timesteps, band.sample(6, replay, stratified=True))
    assert torch.equal(draws.noise, torch.randn((6, 2, 3), generator=replay))
    assert torch.equal(draws.keep_caption, torch.rand(6, generator=replay) >= 0.5)
    assert bool(draw_randomness(band, torch.Generator(), 64, (1,)).keep_caption.all())  # no dropout unless asked


def test_a_bf16_batch_is_noised_and_compared_in_bf16() -> None:
    schedule = NoiseSchedule(prediction_type="v_prediction")
    batch = _batch().to("cpu", torch.bfloat16)
    draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(2), 3, (4, 4, 4))
    out = denoising_loss(_ShiftUNet(), batch, schedule, draws)
    assert out.loss.item() == pytest.approx(_by_hand(batch, schedule, draws, None, torch.bfloat16), rel=1e-6)


def test_noise_is_drawn_in_float32_whatever_the_default_dtype() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(0), 2, (1, 2))
    finally:
        torch.set_default_dtype(previous)
    assert draws.noise.dtype == torch.float32
    assert torch.equal(draws.noise, draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(0), 2,
                                                    (1, 2)).noise)


@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16])
def test_the_loss_is_computed_on_the_latents_device(model_dtype: torch.dtype | None) -> None:
    """Draws are made on the CPU (one generator for every rank); noise, timesteps and weights follow the latents to
    their device. `meta` stands in for an accelerator: a tensor left on the CPU cannot meet one there."""
    from expertune.objective.weighting import WeightTable

    schedule = NoiseSchedule(prediction_type="v_prediction")
    batch = _batch().to("meta")
    draws = draw_randomness(ExpertBand(0, 999), torch.Generator().manual_seed(2), 3, (4, 4, 4))
    table = WeightTable.build(schedule.alphas_cumprod, "min_snr", "v_prediction", 5.0)
    for weights in (None, table):
        out = denoising_loss(_ShiftUNet(), batch, schedule, draws, model_dtype=model_dtype, weights=weights)
        assert out.loss.device.type == "meta" and out.timesteps.device.type == "meta"
