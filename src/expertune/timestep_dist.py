"""Timestep distributions: a probability mass over the N training timesteps, cut to an expert's band.

A distribution is defined once over the whole schedule [0, N - 1] (N = 1000 for SDXL):

- `uniform`: every timestep 1 / N;
- `logit_normal` (Esser et al. 2024, SD3's `logit_normal` weighting scheme, `logit_mean` m and `logit_std` s):
  t / N = sigmoid(u) with u ~ N(m, s²); the mass of timestep k is the probability that N · sigmoid(u) falls in
  [k, k + 1): Φ((logit((k + 1) / N) - m) / s) - Φ((logit(k / N) - m) / s). m < 0 favours low noise, m > 0 high
  noise, s > 1 spreads it towards both ends;
- times SimpleTuner's timestep bias (`timestep_bias_strategy`): the mass of a chosen set of timesteps is
  multiplied by `timestep_bias_multiplier` and the whole renormalised. `earlier`: the first
  int(`timestep_bias_portion` · N) timesteps (low noise); `later`: the last ones (high noise); `range`:
  [`timestep_bias_begin`, `timestep_bias_end`) (end excluded, as SimpleTuner's slice); `none`: no bias.

**Cut to a band by conditioning**: an expert with band [lo, hi] draws from p(t | lo <= t <= hi) = p(t) / P(band),
so the distribution keeps its shape inside the band (musubi-tuner's `--preserve_distribution_shape`,
diffusion-pipe's slicing), rather than being stretched to span the band. A band the distribution gives no mass
is refused.

**Stratified per batch** as `ExpertBand.sample`: with `stratified`, a batch of B draws one timestep from each of
B equal-probability strata of the conditioned distribution (inverse CDF of (order + U) / B); the uniform
distribution keeps `ExpertBand.sample` itself, so runs that do not ask for a distribution draw what they always
drew.

**No compensating weight** is applied: drawing from p inside the band trains, in expectation, the same objective as
drawing uniformly with each sample's loss multiplied by |band| · p(t | band). That re-weighting is the point of the
option; the loss weighting (`loss_weighting`, min-SNR ...) multiplies on top of it. The per-band evaluation does
not draw: it scores fixed timesteps (`experts.fixed_timesteps`), so it is the same whatever the distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertune.experts import ExpertBand

DISTRIBUTIONS = ("uniform", "logit_normal")
BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def uniform_mass(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def _phi(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF through erfc, accurate far into the lower tail (1 + erf(x) cancels there)."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def logit_normal_mass(n: int, mean: float, std: float) -> torch.Tensor:
    """The mass of each integer timestep 0..n-1 when t = n · sigmoid(u), u ~ N(mean, std²) (float64, sums to 1)."""
    if std <= 0:
        raise ValueError(f"logit_std must be > 0, got {std}")
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    z = (torch.logit(edges) - mean) / std  # -inf at 0, +inf at 1
    lo, hi = z[:-1], z[1:]
    # Φ(hi) - Φ(lo), computed in the tail where it does not cancel: Φ(-lo) - Φ(-hi) on the upper side
    upper = lo > 0
    mass = torch.where(upper, _phi(-lo) - _phi(-hi), _phi(hi) - _phi(lo))
    return mass / mass.sum()


def bias_weights(n: int, strategy: str, multiplier: float, begin: int, end: int, portion: float) -> torch.Tensor:
    """SimpleTuner's timestep-bias factor of each timestep (1, or `multiplier` on the biased ones)."""
    weights = torch.ones(n, dtype=torch.float64)
    if strategy == "none":
        return weights
    if multiplier <= 0:
        raise ValueError(f"timestep_bias_multiplier must be > 0, got {multiplier}")
    count = int(portion * n)
    if strategy == "earlier":
        weights[:count] *= multiplier
    elif strategy == "later":
        weights[n - count:] *= multiplier
    elif strategy == "range":
        if not 0 <= begin < end <= n:
            raise ValueError(f"timestep_bias_begin={begin} and timestep_bias_end={end} must satisfy "
                             f"0 <= begin < end <= {n}")
        weights[begin:end] *= multiplier
    else:
        raise ValueError(f"timestep_bias_strategy {strategy!r} is not one of {BIAS_STRATEGIES}")
    return weights


def draw_from_mass(mass: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the index k with CDF(k - 1) <= u < CDF(k) for each u in [0, 1) (zero-mass entries never)."""
    cdf = torch.cumsum(mass.double(), 0)
    cdf = cdf / cdf[-1]
    index = torch.searchsorted(cdf, uniforms.double().contiguous(), right=True)
    return index.clamp_(0, mass.numel() - 1)


def stratified_uniforms(batches: int, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batches, batch_size] uniforms in [0, 1): one in each of the batch_size equal strata per row, strata in a
    random order (a row's argsort of uniforms is a uniform random permutation)."""
    order = torch.rand(batches, batch_size, generator=generator, dtype=torch.float64).argsort(dim=1)
    offsets = torch.rand(batches, batch_size, generator=generator, dtype=torch.float64)
    return (order.double() + offsets) / batch_size


@dataclass(frozen=True)
class TimestepDistribution:
    """A run's training-timestep distribution over the schedule (see the module's docstring)."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    bias_strategy: str = "none"
    bias_multiplier: float = 1.0
    bias_begin: int = 0
    bias_end: int = 1000
    bias_portion: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"timestep_distribution {self.kind!r} is not one of {DISTRIBUTIONS}")
        if self.bias_strategy not in BIAS_STRATEGIES:
            raise ValueError(f"timestep_bias_strategy {self.bias_strategy!r} is not one of {BIAS_STRATEGIES}")

    @property
    def is_uniform(self) -> bool:
        return self.kind == "uniform" and (self.bias_strategy == "none" or self.bias_multiplier == 1.0)

    def mass(self, n: int) -> torch.Tensor:
        """The distribution over the whole schedule 0..n-1 (float64, sums to 1)."""
        base = uniform_mass(n) if self.kind == "uniform" else logit_normal_mass(n, self.logit_mean, self.logit_std)
        biased = base * bias_weights(n, self.bias_strategy, self.bias_multiplier, self.bias_begin,
                                     min(self.bias_end, n), self.bias_portion)
        return biased / biased.sum()

    def band_share(self, band: ExpertBand) -> float:
        """P(lo <= t <= hi) under the whole-schedule distribution."""
        return float(self.mass(band.num_train_timesteps)[band.lo:band.hi + 1].sum())

    def in_band(self, band: ExpertBand) -> torch.Tensor:
        """p(t | band) for t = lo..hi (float64, sums to 1): the whole-schedule mass conditioned on the band."""
        mass = self.mass(band.num_train_timesteps)[band.lo:band.hi + 1]
        total = float(mass.sum())
        if not total > 0 or not math.isfinite(total):
            raise ValueError(f"the timestep distribution ({self.describe()}) gives the band {band} no probability; "
                             "move logit_mean towards the band or widen logit_std")
        return mass / total

    def sample(self, band: ExpertBand, batch_size: int, generator: torch.Generator | None = None,
               stratified: bool = False) -> torch.Tensor:
        """`batch_size` timesteps inside the band from p(t | band) (long, on the CPU)."""
        if self.is_uniform:
            return band.sample(batch_size, generator, stratified=stratified)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        uniforms = (stratified_uniforms(1, batch_size, generator)[0] if stratified
                    else torch.rand(batch_size, generator=generator, dtype=torch.float64))
        return band.lo + draw_from_mass(self.in_band(band), uniforms)

    def describe(self) -> str:
        parts = ["uniform" if self.kind == "uniform" else f"logit_normal(mean={self.logit_mean}, std={self.logit_std})"]
        if self.bias_strategy != "none":
            where = {"earlier": f"first {self.bias_portion:g}", "later": f"last {self.bias_portion:g}",
                     "range": f"[{self.bias_begin}, {self.bias_end})"}[self.bias_strategy]
            parts.append(f"bias x{self.bias_multiplier:g} on the {where}")
        return ", ".join(parts)
