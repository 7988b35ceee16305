"""Per-timestep loss weights: pure functions of the SNR, finite everywhere, zero terminal SNR included.

Every weighting is first defined on the ε-prediction loss and then carried to the loss actually trained,
so that one weighting means one thing whatever the parameterisation. With x_t = √ᾱ x0 + √(1-ᾱ) ε and
SNR = ᾱ / (1 - ᾱ), the three losses of one prediction are related by

    ‖ε̂ - ε‖² = SNR · ‖x̂0 - x0‖² = ᾱ · ‖v̂ - v‖² = SNR / (SNR + 1) · ‖v̂ - v‖²,

so a weight w_ε on the ε loss is w_ε · SNR / (SNR + 1) on the v loss and w_ε · SNR on the x0 loss.

- `none`: w = 1 on the loss being trained.
- `min_snr` (Hang et al. 2023, γ): w_ε = min(SNR, γ) / SNR, hence min(SNR, γ) / (SNR + 1) for v and
  min(SNR, γ) for x0 (REFERENCE-style formulas of the paper). At SNR = 0 the ε form is 0/0: it is given its
  limit, 1 (for SNR < γ the weight is exactly 1). The v and x0 forms are 0 at SNR = 0: under zero terminal
  SNR the last timestep (t = N-1) is then not trained at all — see `band_summary` and the warning.
- `debiased` (Yu et al. 2024, "debiased estimation"): w_ε = 1 / √SNR, hence √SNR / (SNR + 1) for v and √SNR
  for x0. 1/√SNR has no finite value at SNR = 0 nor a useful one as SNR → ∞, so the SNR is clamped to
  [1e-3, 1e3] first (weights of ε within [0.032, 31.6]); the v and x0 forms are 0 at SNR = 0 as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

WEIGHTINGS = ("none", "min_snr", "debiased")
DEBIASED_SNR_RANGE = (1e-3, 1e3)
# A band whose mean weight is below this trains at under a quarter of the unweighted step size.
STARVED_MEAN_WEIGHT = 0.25


def resolve_weighting(loss_weighting: str | None, snr_gamma: float | None) -> str:
    """The weighting a run uses: the explicit choice, else min_snr when snr_gamma is set, else none."""
    if loss_weighting is not None:
        return loss_weighting
    return "min_snr" if snr_gamma is not None else "none"


def epsilon_weights(snr: torch.Tensor, weighting: str, gamma: float | None = None) -> torch.Tensor:
    """w_ε(SNR) for each SNR (float64 maths); finite for every SNR >= 0, including 0 and +inf."""
    snr = snr.double()
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        if gamma is None or gamma <= 0:
            raise ValueError("min_snr needs gamma > 0")
        # min(SNR, γ) / SNR = min(1, γ / SNR): 1 at SNR = 0 (the limit), γ/SNR above γ, 0 at SNR = inf.
        return torch.where(snr > gamma, gamma / snr.clamp_min(gamma), torch.ones_like(snr))
    if weighting == "debiased":
        lo, hi = DEBIASED_SNR_RANGE
        return 1.0 / snr.clamp(lo, hi).sqrt()
    raise ValueError(f"loss weighting {weighting!r} is not one of {WEIGHTINGS}")


def loss_weights(snr: torch.Tensor, weighting: str, prediction_type: str, gamma: float | None = None) -> torch.Tensor:
    """The weight on the MSE of `prediction_type` (epsilon, v_prediction or sample) at each SNR."""
    w = epsilon_weights(snr, weighting, gamma)
    if weighting == "none" or prediction_type == "epsilon":
        return w
    snr = snr.double().clamp_max(1e12)  # finite: SNR = inf (ᾱ = 1) only ever meets a weight of 0 or γ/SNR
    if prediction_type == "v_prediction":
        return w * (snr / (snr + 1.0))
    if prediction_type == "sample":
        return w * snr
    raise ValueError(f"prediction_type {prediction_type!r} is not epsilon, v_prediction or sample")


@dataclass(frozen=True)
class WeightTable:
    """The weight of every training timestep t = 0..N-1 for one run's weighting and parameterisation."""

    weighting: str
    prediction_type: str
    gamma: float | None
    weights: torch.Tensor  # [N] float32

    @classmethod
    def build(cls, alphas_cumprod: torch.Tensor, weighting: str, prediction_type: str,
              gamma: float | None = None) -> "WeightTable":
        a = alphas_cumprod.double()
        snr = torch.where(a >= 1.0, torch.full_like(a, float("inf")), a / (1.0 - a))
        return cls(weighting, prediction_type, gamma, loss_weights(snr, weighting, prediction_type, gamma).float())

    @property
    def active(self) -> bool:
        return self.weighting != "none"

    def for_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.weights.to(timesteps.device)[timesteps]

    def band_summary(self, lo: int, hi: int) -> dict[str, Any]:
        """Mean, min and max weight over the inclusive band [lo, hi], and the timesteps whose weight is 0."""
        band = self.weights[lo:hi + 1].double()
        zero = torch.nonzero(band == 0).flatten() + lo
        return {"weighting": self.weighting, "prediction_type": self.prediction_type, "snr_gamma": self.gamma,
                "mean": round(float(band.mean()), 6), "min": round(float(band.min()), 6),
                "max": round(float(band.max()), 6), "zero_weight_timesteps": [int(t) for t in zero]}

    def starvation(self, lo: int, hi: int) -> str | None:
        """A warning when the weighting starves the band [lo, hi], else None."""
        if not self.active:
            return None
        s = self.band_summary(lo, hi)
        problems = []
        if s["mean"] < STARVED_MEAN_WEIGHT:
            problems.append(f"its mean weight over the band is {s['mean']:.3g} (the band trains at about "
                            f"{s['mean']:.0%} of the unweighted step size)")
        zero = s["zero_weight_timesteps"]
        if zero:
            shown = ", ".join(str(t) for t in zero[:3]) + (" ..." if len(zero) > 3 else "")
            problems.append(f"timestep(s) {shown} get weight 0 and are not trained at all")
        if not problems:
            return None
        hint = ("--loss_weighting=none" if self.prediction_type != "epsilon"
                else "a larger --snr_gamma or --loss_weighting=none")
        return (f"loss weighting {self.weighting} ({self.prediction_type}) starves the band [{lo}, {hi}]: "
                + "; ".join(problems) + f". Consider {hint} for this expert")


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of each sample's MSE times its weight (unweighted: the plain MSE)."""
    if weights is None:
        return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()
