"""One expert's denoising loss: noise a batch inside the band, predict, compare with the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from expertune.data.batches import TrainingBatch
from expertune.experts import ExpertBand
from expertune.schedule import NoiseSchedule, add_noise, training_target
from expertune.objective.weighting import WeightTable, weighted_mse


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
    noise_offset: float = 0.0,
    noise_offset_probability: float = 1.0,
) -> StepRandomness:
    """Timesteps (inside the band, vectorised), noise and caption-dropout mask, in that order, on the CPU; then,
    with `noise_offset` > 0, the offset noise (`offset_noise`)."""
    timesteps = band.sample(global_size, generator, stratified=stratified)
    noise = torch.randn((global_size, *latent_shape), generator=generator, dtype=torch.float32)
    keep = torch.rand(global_size, generator=generator) >= caption_dropout
    if noise_offset > 0:
        noise = offset_noise(noise, noise_offset, noise_offset_probability, generator)
    return StepRandomness(timesteps, noise, keep)


def offset_noise(noise: torch.Tensor, strength: float, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023; diffusers' and SimpleTuner's `noise_offset`): each sample's noise plus
    `strength` * N(0, 1) of shape (C, 1, 1), one constant per channel, with probability `probability` per sample
    (SimpleTuner decides once per batch; the same for a batch of one). The offset noise is also the target."""
    b, c = noise.shape[:2]
    offset = torch.randn((b, c, *([1] * (noise.dim() - 2))), generator=generator, dtype=noise.dtype)
    chosen = (torch.rand(b, generator=generator) < probability).to(noise.dtype).view(b, *([1] * (noise.dim() - 1)))
    return noise + strength * offset * chosen


@dataclass
class LossOutput:
    loss: torch.Tensor
    timesteps: torch.Tensor


def denoising_loss(unet: Any, batch: TrainingBatch, schedule: NoiseSchedule, draws: StepRandomness,
                   model_dtype: torch.dtype | None = None, weights: WeightTable | None = None) -> LossOutput:
    """Mean-squared error between the UNet's prediction and the target at the drawn timesteps, each sample
    weighted by `weights` (objective/weighting.py) when given and active.

    The one loss of the project: training minimises it, validation's held-out loss measures it (with the
    expert's own weighting). The noisy input and target are computed in the batch's dtype; `model_dtype` casts
    what the UNet gets (a bf16 UNet validated on float32 latents), None feeds the batch as it is.
    """
    latents = batch.latents
    noise = draws.noise.to(latents.device, latents.dtype)
    timesteps = draws.timesteps.to(latents.device)
    noisy = add_noise(latents, noise, timesteps, schedule.alphas_cumprod)
    target = training_target(latents, noise, timesteps, schedule.alphas_cumprod, schedule.prediction_type)
    conditioning = batch if model_dtype is None else batch.to(latents.device, model_dtype)
    prediction = unet(
        noisy if model_dtype is None else noisy.to(model_dtype),
        timesteps,
        encoder_hidden_states=conditioning.prompt_embeds,
        added_cond_kwargs={"text_embeds": conditioning.pooled_embeds, "time_ids": conditioning.time_ids},
        return_dict=False,
    )[0]
    if weights is None or not weights.active:
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
    else:
        loss = weighted_mse(prediction, target, weights.for_timesteps(timesteps))
    return LossOutput(loss=loss, timesteps=timesteps)
