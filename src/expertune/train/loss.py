"""One expert's denoising loss: noise a batch inside the band, predict, compare with the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from expertune.experts import ExpertBand
from expertune.schedule import NoiseSchedule, add_noise, training_target
from expertune.train.weighting import WeightTable, weighted_mse


@dataclass
class TrainingBatch:
    """Cached tensors for one micro-batch (everything the UNet needs besides noise and t)."""

    latents: torch.Tensor  # [B, 4, h, w], already scaled by the VAE's scaling factor
    prompt_embeds: torch.Tensor  # [B, 77, d1 + d2]
    pooled_embeds: torch.Tensor  # [B, d_pool]
    time_ids: torch.Tensor  # [B, 6]: orig_h, orig_w, crop_top, crop_left, target_h, target_w

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TrainingBatch":
        return TrainingBatch(*(t.to(device=device, dtype=dtype) for t in
                               (self.latents, self.prompt_embeds, self.pooled_embeds, self.time_ids)))

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class StepRandomness:
    """The random draws of one global micro-batch. Every rank draws the same (one shared generator) and
    takes its slice, so N processes with batch b see exactly what one process with batch N*b sees."""

    timesteps: torch.Tensor  # [G] long, inside the band
    noise: torch.Tensor  # [G, C, h, w]
    keep_caption: torch.Tensor  # [G] bool: False where caption dropout zeroes the text conditioning

    def for_rank(self, rank: int, world_size: int) -> "StepRandomness":
        return StepRandomness(self.timesteps[rank::world_size], self.noise[rank::world_size],
                              self.keep_caption[rank::world_size])


def draw_randomness(
    band: ExpertBand,
    generator: torch.Generator,
    global_size: int,
    latent_shape: tuple[int, ...],
    caption_dropout: float = 0.0,
    stratified: bool = False,
) -> StepRandomness:
    """Timesteps (inside the band, vectorised), noise and caption-dropout mask, in that order, on the CPU."""
    timesteps = band.sample(global_size, generator, stratified=stratified)
    noise = torch.randn((global_size, *latent_shape), generator=generator, dtype=torch.float32)
    keep = torch.rand(global_size, generator=generator) >= caption_dropout
    return StepRandomness(timesteps, noise, keep)


@dataclass
class LossOutput:
    loss: torch.Tensor
    timesteps: torch.Tensor


def denoising_loss(unet: Any, batch: TrainingBatch, schedule: NoiseSchedule, draws: StepRandomness,
                   weights: WeightTable | None = None) -> LossOutput:
    """Mean-squared error between the UNet's prediction and the target at the drawn timesteps, each sample
    weighted by `weights` (train/weighting.py) when given and active."""
    latents = batch.latents
    noise = draws.noise.to(latents.device, latents.dtype)
    timesteps = draws.timesteps.to(latents.device)
    noisy = add_noise(latents, noise, timesteps, schedule.alphas_cumprod)
    target = training_target(latents, noise, timesteps, schedule.alphas_cumprod, schedule.prediction_type)
    prediction = unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch.prompt_embeds,
        added_cond_kwargs={"text_embeds": batch.pooled_embeds, "time_ids": batch.time_ids},
        return_dict=False,
    )[0]
    if weights is None or not weights.active:
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
    else:
        loss = weighted_mse(prediction, target, weights.for_timesteps(timesteps))
    return LossOutput(loss=loss, timesteps=timesteps)
