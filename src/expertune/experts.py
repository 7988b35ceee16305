"""Expert bands: which timesteps an expert learns, how its band is derived, and sampling inside it.

One convention throughout: a band is the inclusive integer interval [lo, hi] of training timesteps,
0 <= lo <= hi <= N - 1. Stage 1 (the "base") holds N - 1, stage 2 (the "refiner") holds 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def boundary_from_strength(strength: float, num_train_timesteps: int) -> int:
    """t_b = int(s * N), robust to binary rounding (0.29 * 100 is 28.999... in floating point)."""
    if not 0.0 < strength < 1.0:
        raise ValueError(f"refiner_training_strength must be in (0, 1), got {strength}")
    return math.floor(strength * num_train_timesteps + 1e-9)


@dataclass(frozen=True, order=True)
class ExpertBand:
    """The inclusive timestep interval [lo, hi] one expert is trained on, out of N."""

    lo: int
    hi: int
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi <= self.num_train_timesteps - 1:
            raise ValueError(
                f"expert band [{self.lo}, {self.hi}] must satisfy 0 <= lo <= hi <= "
                f"{self.num_train_timesteps - 1} (num_train_timesteps={self.num_train_timesteps})"
            )

    @classmethod
    def full(cls, num_train_timesteps: int) -> "ExpertBand":
        return cls(0, num_train_timesteps - 1, num_train_timesteps)

    @classmethod
    def from_refiner_flags(
        cls, num_train_timesteps: int, refiner_training: bool, strength: float, invert_schedule: bool
    ) -> "ExpertBand":
        """REFERENCE §1: refiner → [0, t_b - 1]; refiner + invert → [t_b, N - 1]; neither → [0, N - 1]."""
        n = num_train_timesteps
        if not refiner_training:
            if invert_schedule:
                raise ValueError("--refiner_training_invert_schedule needs --refiner_training")
            return cls.full(n)
        boundary = boundary_from_strength(strength, n)
        if boundary < 1:
            raise ValueError(f"refiner_training_strength={strength} leaves no timestep below the boundary")
        return cls(boundary, n - 1, n) if invert_schedule else cls(0, boundary - 1, n)

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    @property
    def holds_start(self) -> bool:
        """True for a stage-1 band: it starts denoising from pure noise (t = N - 1)."""
        return self.hi == self.num_train_timesteps - 1

    @property
    def holds_end(self) -> bool:
        """True for a final-stage band: it finishes the image (t = 0)."""
        return self.lo == 0

    @property
    def denoising_start(self) -> float | None:
        """diffusers' `denoising_start` that hands this expert exactly the inference steps t <= hi."""
        return None if self.holds_start else 1.0 - (self.hi + 1) / self.num_train_timesteps

    @property
    def denoising_end(self) -> float | None:
        """diffusers' `denoising_end` that keeps exactly the inference steps t >= lo."""
        return None if self.holds_end else 1.0 - self.lo / self.num_train_timesteps

    def contains(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps >= self.lo) & (timesteps <= self.hi)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        stratified: bool = False,
    ) -> torch.Tensor:
        """`batch_size` integer timesteps inside [lo, hi], vectorised, for any batch size (1 included).

        Stratified: the band is cut into `batch_size` equal strata and one timestep drawn in each
        (strata in random order), which lowers the variance of a batch's loss across the band.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not stratified:
            return torch.randint(self.lo, self.hi + 1, (batch_size,), generator=generator, device=device)
        offsets = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        order = torch.randperm(batch_size, generator=generator, device=device).to(torch.float64)
        position = (order + offsets) * (self.size / batch_size)
        return (self.lo + position.floor().long()).clamp_(self.lo, self.hi)

    def to_json(self) -> list[int]:
        return [self.lo, self.hi]

    def __str__(self) -> str:
        return f"[{self.lo}, {self.hi}]"


def parse_timestep_range(text: str) -> tuple[int, int]:
    """``"LO,HI"`` (inclusive integer timesteps, 0 <= LO <= HI) → ``(LO, HI)``; ValueError otherwise.

    The one parser of the project (the config check wraps it); the upper bound against the scheduler's
    number of timesteps is checked by `ExpertBand`.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"timestep_range={text!r} is not valid: expected 'LO,HI' with two integers, e.g. '0,349'")
    lo, hi = int(parts[0]), int(parts[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"timestep_range={text!r} is not valid: expected 0 <= LO <= HI")
    return lo, hi


def band_from_settings(
    num_train_timesteps: int,
    *,
    refiner_training: bool,
    refiner_training_strength: float,
    refiner_training_invert_schedule: bool,
    timestep_range: str | None,
) -> ExpertBand:
    """The band a training run's flags select (explicit `timestep_range` or the refiner flags)."""
    if timestep_range is not None:
        lo, hi = parse_timestep_range(timestep_range)
        return ExpertBand(lo, hi, num_train_timesteps)
    return ExpertBand.from_refiner_flags(
        num_train_timesteps, refiner_training, refiner_training_strength, refiner_training_invert_schedule
    )


def order_chain(bands: Sequence[ExpertBand]) -> list[int]:
    """Indices of `bands` in the order they denoise (highest noise first)."""
    return sorted(range(len(bands)), key=lambda i: -bands[i].hi)


def partition_problems(bands: Sequence[ExpertBand]) -> list[str]:
    """Gaps and overlaps in a chain of bands, which must tile [0, N - 1] exactly."""
    problems: list[str] = []
    ordered = [bands[i] for i in order_chain(bands)]
    n_values = {b.num_train_timesteps for b in ordered}
    if len(n_values) > 1:
        return [f"experts disagree on num_train_timesteps: {sorted(n_values)}"]
    n = ordered[0].num_train_timesteps
    if ordered[0].hi != n - 1:
        problems.append(f"no expert holds t = {n - 1} (highest band is {ordered[0]})")
    if ordered[-1].lo != 0:
        problems.append(f"no expert holds t = 0 (lowest band is {ordered[-1]})")
    for upper, lower in zip(ordered, ordered[1:]):
        if lower.hi >= upper.lo:
            problems.append(f"bands {lower} and {upper} overlap")
        elif lower.hi + 1 < upper.lo:
            problems.append(f"bands {lower} and {upper} leave a gap [{lower.hi + 1}, {upper.lo - 1}]")
    return problems


def sub_bands(band: ExpertBand, count: int) -> list[ExpertBand]:
    """`band` cut into `count` contiguous sub-bands of (nearly) equal size, lowest first.

    Cut points are `lo + floor(k * size / count)` for k = 0..count, so the sub-bands tile the band exactly
    and their sizes differ by at most one: [350, 999] in four is [350, 511], [512, 674], [675, 836],
    [837, 999]; [0, 349] in four is [0, 86], [87, 174], [175, 261], [262, 349].
    """
    if not 1 <= count <= band.size:
        raise ValueError(f"cannot cut band {band} ({band.size} timesteps) into {count} sub-bands")
    cuts = [band.lo + (k * band.size) // count for k in range(count + 1)]
    return [ExpertBand(cuts[k], cuts[k + 1] - 1, band.num_train_timesteps) for k in range(count)]


def fixed_timesteps(band: ExpertBand, count: int) -> list[int]:
    """`count` evenly spread timesteps inside `band`: the midpoints of `count` equal strata, ascending.

    Deterministic (no generator), so a held-out loss measured at these timesteps is comparable from one
    validation to the next. Repeats appear only when `count` exceeds the band's size.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return [band.lo + ((2 * j + 1) * band.size) // (2 * count) for j in range(count)]
