"""The noise schedule and the parameterisation being trained: pure tensor maths, no I/O.

References: SDXL's scaled-linear betas; zero terminal SNR by
Lin et al. 2023, Algorithm 1; v-prediction by Salimans & Ho 2022 (`v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0`).
`NoiseSchedule` is the single source of truth for the prediction type: the loss target, the saved
scheduler config, `expert.json` and the validation sampler all read it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "linspace", "trailing"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")


def make_betas(
    num_train_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """β_t for t = 0..N-1 (float32, as diffusers computes them)."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (use scaled_linear or linear)")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so that ᾱ_{N-1} = 0 while ᾱ_0 is unchanged (Lin et al., Algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def signal_to_noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t); 0 at a zero-terminal-SNR final step."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> list[int]:
    """The descending timesteps a diffusers sampler visits for the given spacing (REFERENCE §2)."""
    n, steps = num_train_timesteps, num_inference_steps
    if spacing == "trailing":
        values = [round(v) - 1 for v in _arange_desc(n, 0, n / steps)]
    elif spacing == "leading":
        ratio = n // steps
        values = [i * ratio + steps_offset for i in reversed(range(steps))]
    elif spacing == "linspace":
        values = [round((n - 1) * i / (steps - 1)) if steps > 1 else 0 for i in reversed(range(steps))]
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return values


def _arange_desc(start: float, stop: float, step: float) -> list[float]:
    count = math.ceil((start - stop) / step)
    return [start - i * step for i in range(count)]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, per sample."""
    alpha_bar = _per_sample(alphas_cumprod, timesteps, x0)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def training_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet must output: ε, v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod, timesteps, x0)
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    picked = values.to(device=like.device)[timesteps.to(like.device)].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """The training schedule and parameterisation of one expert."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    training_timestep_spacing: str = "trailing"
    inference_timestep_spacing: str = "trailing"
    _alphas_cumprod: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        betas = make_betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        object.__setattr__(self, "_alphas_cumprod", alphas_cumprod_from_betas(betas))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        assert self._alphas_cumprod is not None
        return self._alphas_cumprod

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict[str, Any], **overrides: Any) -> "NoiseSchedule":
        """Read the pretrained model's schedule; `overrides` set to None keep the model's value."""
        base = cls(
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
            beta_start=float(scheduler_config.get("beta_start", 0.00085)),
            beta_end=float(scheduler_config.get("beta_end", 0.012)),
            beta_schedule=str(scheduler_config.get("beta_schedule", "scaled_linear")),
            prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
            rescale_betas_zero_snr=bool(scheduler_config.get("rescale_betas_zero_snr", False)),
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def scheduler_config(self, pretrained: dict[str, Any]) -> dict[str, Any]:
        """The pretrained scheduler config updated to what this expert was trained for."""
        updated = {k: v for k, v in pretrained.items() if not k.startswith("_")}
        updated.update(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
            timestep_spacing=self.inference_timestep_spacing,
        )
        return updated

    def describe(self) -> dict[str, Any]:
        """The parameterisation as recorded in expert.json."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            "timestep_spacing": self.inference_timestep_spacing,
            "training_timestep_spacing": self.training_timestep_spacing,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def warnings(self) -> list[str]:
        """Combinations that train but are known to work badly."""
        found = []
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            found.append(
                "rescale_betas_zero_snr with prediction_type=epsilon: the final step has SNR 0 and an "
                "epsilon target carries no signal there; use --prediction_type=v_prediction or sample"
            )
        if self.rescale_betas_zero_snr and self.inference_timestep_spacing != "trailing":
            found.append(
                "rescale_betas_zero_snr with inference spacing "
                f"{self.inference_timestep_spacing!r}: sampling will not start at the zero-SNR step; "
                "use --inference_scheduler_timestep_spacing=trailing"
            )
        return found
