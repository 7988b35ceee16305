"""Timestep distributions (timestep_dist.py): 10^6 draws per distribution and band against the conditioned mass."""

from __future__ import annotations

import math

import pytest
import torch

from expertune.experts import ExpertBand
from expertune.timestep_dist import (TimestepDistribution, bias_weights, draw_from_mass, logit_normal_mass,
                                     stratified_uniforms)

N = 1000
DRAWS = 1_000_000
BANDS = [ExpertBand(0, 999), ExpertBand(0, 349), ExpertBand(350, 999), ExpertBand(700, 999)]
DISTRIBUTIONS = {
    "logit_normal": TimestepDistribution("logit_normal", 0.0, 1.0),
    "logit_normal_low": TimestepDistribution("logit_normal", -1.0, 0.7),
    "later_x3": TimestepDistribution(bias_strategy="later", bias_multiplier=3.0, bias_portion=0.25),
    "earlier_x0.5": TimestepDistribution(bias_strategy="earlier", bias_multiplier=0.5, bias_portion=0.5),
    "range_x5": TimestepDistribution(bias_strategy="range", bias_multiplier=5.0, bias_begin=200, bias_end=400),
    "logit_normal_later": TimestepDistribution("logit_normal", 0.5, 1.2, "later", 2.0, bias_portion=0.1),
}


def chi_square(counts: torch.Tensor, mass: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, over groups of neighbouring timesteps pooled until each
    expects at least 5 draws (the usual validity condition: a tail timestep expecting 1e-4 draws would dominate)."""
    expected = mass * counts.sum()
    assert int(counts[expected == 0].sum()) == 0, "a timestep without probability was drawn"
    groups = int(float(expected.sum()) // 5)
    ids = (torch.cumsum(expected, 0) / 5).floor().long().clamp_(max=groups - 1)  # the tail joins the last group
    observed = torch.bincount(ids, weights=counts.double(), minlength=groups)
    pooled = torch.bincount(ids, weights=expected, minlength=groups)
    keep = pooled > 0
    stat = float(((observed[keep] - pooled[keep]) ** 2 / pooled[keep]).sum())
    return stat, int(keep.sum()) - 1


def chi_square_bound(dof: int) -> float:
    """χ²(dof) has mean dof and standard deviation √(2 dof); dof + 6 sd is exceeded with probability < 1e-6 for
    dof in the hundreds (the normal approximation's 6σ tail is 1e-9, the χ² tail is a little heavier)."""
    return dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_draws_follow_the_mass_conditioned_on_each_band(name: str) -> None:
    distribution = DISTRIBUTIONS[name]
    whole = distribution.mass(N)
    for k, band in enumerate(BANDS):
        conditioned = distribution.in_band(band)
        # conditioning, not rescaling: the shape inside the band is the whole-schedule shape
        assert torch.allclose(conditioned, whole[band.lo:band.hi + 1] / whole[band.lo:band.hi + 1].sum())
        g = torch.Generator().manual_seed(1000 + k)
        drawn = distribution.sample(band, DRAWS, g)
        assert int(drawn.min()) >= band.lo and int(drawn.max()) <= band.hi
        counts = torch.bincount(drawn - band.lo, minlength=band.size)
        stat, dof = chi_square(counts, conditioned)
        assert stat < chi_square_bound(dof), (name, str(band), stat, dof)
        # stratified per batch (batches of 8, as training draws them): the same distribution, less variance
        strata = stratified_uniforms(DRAWS // 8, 8, g).flatten()
        counts = torch.bincount(draw_from_mass(conditioned, strata), minlength=band.size)
        stat_s, _ = chi_square(counts, conditioned)
        assert stat_s < chi_square_bound(dof), (name, str(band), stat_s, dof)


def test_the_test_notices_a_rescaled_shape() -> None:
    """Stretching the whole-schedule shape over the band (what conditioning avoids) fails the same test."""
    distribution, band = DISTRIBUTIONS["logit_normal"], ExpertBand(0, 349)
    whole = distribution.mass(N)
    stretched = whole[torch.linspace(0, N - 1, band.size).round().long()]
    stretched = stretched / stretched.sum()
    drawn = draw_from_mass(stretched, torch.rand(DRAWS, generator=torch.Generator().manual_seed(3),
                                                  dtype=torch.float64))
    stat, dof = chi_square(torch.bincount(drawn, minlength=band.size), distribution.in_band(band))
    assert stat > 100 * chi_square_bound(dof)


def test_stratified_batches_take_one_timestep_per_stratum() -> None:
    distribution, band, batch = DISTRIBUTIONS["later_x3"], ExpertBand(350, 999), 8
    mass = distribution.in_band(band)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
    for seed in range(20):
        drawn = distribution.sample(band, batch, torch.Generator().manual_seed(seed), stratified=True) - band.lo
        u = stratified_uniforms(1, batch, torch.Generator().manual_seed(seed))[0]
        assert sorted((u * batch).floor().long().tolist()) == list(range(batch))  # one u per stratum
        assert bool(((cdf[drawn] <= u + 1e-12) & (u < cdf[drawn + 1] + 1e-12)).all())  # each t is its u's quantile


def test_logit_normal_mass_is_the_integral_of_its_density() -> None:
    mass = logit_normal_mass(N, 0.3, 0.8)
    assert float(mass.sum()) == pytest.approx(1.0, abs=1e-12)
    # the mass of timestep k is P(k <= N sigmoid(u) < k + 1): the density of t times 1, at the bin's middle
    for k in (1, 100, 500, 900, 998):
        x = (k + 0.5) / N
        density = math.exp(-((math.log(x / (1 - x)) - 0.3) ** 2) / (2 * 0.8 ** 2)) / (0.8 * math.sqrt(2 * math.pi)
                                                                                    * x * (1 - x)) / N
        assert float(mass[k]) == pytest.approx(density, rel=2e-3)
    assert bool((mass > 0).all())  # the tails are computed where they do not cancel


def test_simpletuner_bias_weights() -> None:
    later = bias_weights(N, "later", 3.0, 0, 1000, 0.25)
    assert later[:750].eq(1).all() and later[750:].eq(3).all()
    earlier = bias_weights(N, "earlier", 2.0, 0, 1000, 0.1)
    assert earlier[:100].eq(2).all() and earlier[100:].eq(1).all()
    ranged = bias_weights(N, "range", 4.0, 200, 300, 0.25)
    assert ranged[200:300].eq(4).all() and ranged.sum() == 1000 + 3 * 100
    mass = TimestepDistribution(bias_strategy="later", bias_multiplier=3.0).mass(N)
    assert float(mass[999]) == pytest.approx(3 / (750 + 3 * 250))
    with pytest.raises(ValueError, match="timestep_bias_begin"):
        bias_weights(N, "range", 4.0, 300, 300, 0.25)


def test_uniform_keeps_the_bands_own_draws() -> None:
    band = ExpertBand(0, 349)
    for stratified in (False, True):
        a = TimestepDistribution().sample(band, 16, torch.Generator().manual_seed(7), stratified)
        b = band.sample(16, torch.Generator().manual_seed(7), stratified=stratified)
        assert torch.equal(a, b)
    assert TimestepDistribution(bias_strategy="later", bias_multiplier=1.0).is_uniform


def test_a_band_without_probability_is_refused() -> None:
    far = TimestepDistribution("logit_normal", -40.0, 0.5)
    with pytest.raises(ValueError, match=r"band \[700, 999\] no probability"):
        far.in_band(ExpertBand(700, 999))
