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
