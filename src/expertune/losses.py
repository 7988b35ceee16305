"""Loss types of the denoising objective: pure functions of a prediction, its target and the timesteps.

SimpleTuner's `--loss_type` (after kohya sd-scripts' "scheduled pseudo-Huber loss", Khrapov et al. 2024,
"Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss"):

- `l2`: (p - y)², the mean squared error (the default, and what the per-band evaluation always scores);
- `huber`: the pseudo-Huber loss 2c·(√((p - y)² + c²) - c): ≈ (p - y)² for |p - y| << c (the same scale as l2),
  ≈ 2c·|p - y| for |p - y| >> c, so large residuals (outlier images, corrupted pixels) pull with a bounded force;
- `smooth_l1`: 2·(√((p - y)² + c²) - c) = the huber value / c: ≈ (p - y)² / c near 0 and 2·|p - y| far out.

`pseudo_huber` is accepted as another name of `huber` (it is the same closed form).

The threshold c depends on the timestep through `--huber_schedule` (c₀ = `--huber_c`, N timesteps):
- `constant`: c = c₀;
- `exponential`: c = exp(-α t) with α = -ln(c₀) / N, i.e. c₀^(t/N): 1 at t = 0 (l2-like at low noise), c₀ at
  t = N (robust at high noise);
- `snr`: c = (1 - c₀) / (1 + σ)² + c₀ with σ = √((1 - ᾱ_t) / ᾱ_t): 1 where σ = 0, → c₀ as σ → ∞ (zero terminal
  SNR included: σ = ∞ gives exactly c₀).

Each sample's loss is the mean over its elements; the per-timestep weighting (objective/weighting.py) multiplies it
as it does the MSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
LOSS_TYPE_ALIASES = {"mse": "l2", "pseudo_huber": "huber"}


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, c: float) -> torch.Tensor:
    """The threshold c(t) of each timestep (float64, shape of `timesteps`)."""
    if c <= 0:
        raise ValueError(f"huber_c must be > 0, got {c}")
    t = timesteps.to("cpu", torch.float64)
    if schedule == "constant":
        return torch.full_like(t, float(c))
    if schedule == "exponential":
        alpha = -math.log(c) / alphas_cumprod.numel()
        return torch.exp(-alpha * t)
    if schedule == "snr":
        a = alphas_cumprod.double()[timesteps.to("cpu").long()]
        sigma = torch.where(a > 0, ((1.0 - a) / a.clamp_min(1e-300)).sqrt(), torch.full_like(a, math.inf))
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"huber_schedule {schedule!r} is not one of {HUBER_SCHEDULES}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, in float32; `threshold` is c per sample ([B]) for huber and smooth_l1."""
    residual = prediction.float() - target.float()
    if loss_type == "l2":
        return residual.pow(2)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    if threshold is None:
        raise ValueError(f"loss_type {loss_type} needs a threshold c per sample")
    c = threshold.to(residual.device, residual.dtype).view(-1, *([1] * (residual.dim() - 1)))
    robust = (residual.pow(2) + c * c).sqrt() - c
    return 2 * c * robust if loss_type == "huber" else 2 * robust


@dataclass(frozen=True)
class LossType:
    """One run's loss type with its threshold schedule (unused by l2)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule {self.huber_schedule!r} is not one of {HUBER_SCHEDULES}")

    @property
    def is_l2(self) -> bool:
        return self.loss_type == "l2"

    def per_sample(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """Each sample's mean elementwise loss, [B] float32."""
        threshold = None
        if not self.is_l2:
            threshold = huber_threshold(timesteps, alphas_cumprod, self.huber_schedule, self.huber_c)
        return elementwise_loss(prediction, target, self.loss_type, threshold).flatten(1).mean(dim=1)
