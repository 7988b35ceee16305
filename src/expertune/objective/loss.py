"""One expert's denoising loss: noise a batch inside the band, predict, compare with the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from expertune.data.batches import TrainingBatch
from expertune.experts import ExpertBand
from expertune.data.masks import masked_mean
from expertune.losses import LossType, elementwise_loss, huber_threshold
from expertune.schedule import NoiseSchedule, add_noise, training_target
from expertune.objective.weighting import WeightTable, weighted_mse
from expertune.timestep_dist import TimestepDistribution


@dataclass
class StepRandomness:
    """The random draws of one global micro-batch. Every rank draws the same (one shared generator) and
    takes its slice, so N processes with batch b see exactly what one process with batch N*b sees."""

    timesteps: torch.Tensor  # [G] long, inside the band
    noise: torch.Tensor  # [G, C, h, w]
    keep_caption: torch.Tensor  # [G] bool: False where caption dropout zeroes the text conditioning
    # input perturbation (issue 23): the noise the noisy input is made with, when it is not `noise` (the target's)
    input_noise: torch.Tensor | None = None
    use_masks: bool = True  # masked loss: whether this micro-batch's loss masks apply (masked_loss_probability)

    def for_rank(self, rank: int, world_size: int) -> "StepRandomness":
        return StepRandomness(self.timesteps[rank::world_size], self.noise[rank::world_size],
                              self.keep_caption[rank::world_size],
                              None if self.input_noise is None else self.input_noise[rank::world_size],
                              self.use_masks)


def draw_randomness(
    band: ExpertBand,
    generator: torch.Generator,
    global_size: int,
    latent_shape: tuple[int, ...],
    caption_dropout: float = 0.0,
    stratified: bool = False,
    noise_offset: float = 0.0,
    noise_offset_probability: float = 1.0,
    distribution: TimestepDistribution | None = None,
    input_perturbation: float = 0.0,
    masked_loss_probability: float | None = None,
) -> StepRandomness:
    """Timesteps (inside the band from `distribution` conditioned on it, uniform when None; vectorised), noise and
    caption-dropout mask, in that order, on the CPU; then, with `noise_offset` > 0, the offset noise
    (`offset_noise`); then, with `input_perturbation` > 0, the perturbed input noise (`perturbed_input_noise`)."""
    if distribution is None:
        timesteps = band.sample(global_size, generator, stratified=stratified)
    else:
        timesteps = distribution.sample(band, global_size, generator, stratified=stratified)
    noise = torch.randn((global_size, *latent_shape), generator=generator, dtype=torch.float32)
    keep = torch.rand(global_size, generator=generator) >= caption_dropout
    if noise_offset > 0:
        noise = offset_noise(noise, noise_offset, noise_offset_probability, generator)
    input_noise = perturbed_input_noise(noise, input_perturbation, generator) if input_perturbation > 0 else None
    use_masks = True
    if masked_loss_probability is not None and masked_loss_probability < 1:  # a batch with masks: one draw
        use_masks = bool(torch.rand((), generator=generator) < masked_loss_probability)
    return StepRandomness(timesteps, noise, keep, input_noise, use_masks)


def input_perturbation_strength(strength: float, decay_steps: int, step: int) -> float:
    """SimpleTuner's `input_perturbation` at optimizer step `step` (0 for the first): `strength`, or with
    `input_perturbation_steps` > 0 the linear decay strength * (1 - step / decay_steps), 0 from decay_steps on."""
    if strength <= 0:
        return 0.0
    if decay_steps > 0:
        return strength * (1.0 - step / decay_steps) if step < decay_steps else 0.0
    return strength


def perturbed_input_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models";
    diffusers' and SimpleTuner's `input_perturbation`): the noisy input is made with noise + strength * N(0, 1)
    while the target keeps `noise`, so the model learns to correct the small errors it makes at sampling time."""
    return noise + strength * torch.randn(noise.shape, generator=generator, dtype=noise.dtype)


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
                   model_dtype: torch.dtype | None = None, weights: WeightTable | None = None,
                   loss_type: LossType | None = None, use_masks: bool = False) -> LossOutput:
    """Mean-squared error (or `loss_type`'s huber / smooth_l1, losses.py) between the UNet's prediction and the
    target at the drawn timesteps, each sample weighted by `weights` (objective/weighting.py) when given and active.

    The one loss of the project: training minimises it, validation's held-out loss measures it (with the
    expert's own weighting, always as MSE: it passes no `loss_type`). The noisy input and target are computed
    in the batch's dtype; `model_dtype` casts
    what the UNet gets (a bf16 UNet validated on float32 latents), None feeds the batch as it is.
    """
    latents = batch.latents
    noise = draws.noise.to(latents.device, latents.dtype)
    timesteps = draws.timesteps.to(latents.device)
    noisy_with = noise if draws.input_noise is None else draws.input_noise.to(latents.device, latents.dtype)
    noisy = add_noise(latents, noisy_with, timesteps, schedule.alphas_cumprod)
    target = training_target(latents, noise, timesteps, schedule.alphas_cumprod, schedule.prediction_type)
    conditioning = batch if model_dtype is None else batch.to(latents.device, model_dtype)
    prediction = unet(
        noisy if model_dtype is None else noisy.to(model_dtype),
        timesteps,
        encoder_hidden_states=conditioning.prompt_embeds,
        added_cond_kwargs={"text_embeds": conditioning.pooled_embeds, "time_ids": conditioning.time_ids},
        return_dict=False,
    )[0]
    masks = batch.masks if use_masks else None
    if masks is not None:  # issue 23: each latent element's loss times its mask (data/masks.py)
        threshold = (None if loss_type is None or loss_type.is_l2
                     else huber_threshold(timesteps, schedule.alphas_cumprod, loss_type.huber_schedule,
                                          loss_type.huber_c))
        elementwise = elementwise_loss(prediction, target, "l2" if loss_type is None else loss_type.loss_type,
                                       threshold)
        per_sample = masked_mean(elementwise, masks)
        if weights is not None and weights.active:
            per_sample = per_sample * weights.for_timesteps(timesteps).to(per_sample.device, per_sample.dtype)
        loss = per_sample.mean()
    elif loss_type is not None and not loss_type.is_l2:
        per_sample = loss_type.per_sample(prediction, target, timesteps, schedule.alphas_cumprod)
        if weights is not None and weights.active:
            per_sample = per_sample * weights.for_timesteps(timesteps).to(per_sample.device, per_sample.dtype)
        loss = per_sample.mean()
    elif weights is None or not weights.active:
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
    else:
        loss = weighted_mse(prediction, target, weights.for_timesteps(timesteps))
    return LossOutput(loss=loss, timesteps=timesteps)
