"""The mixture plan: N experts that tile the schedule, where their boundaries fall, and who trains when.

Pure functions, no I/O. A plan is written highest boundary first, `--mixture_boundaries B1,B2,...`, and
makes len + 1 experts in chain order (the first denoises from pure noise):

    expert 0 owns [B1, N - 1], expert k owns [B(k+1), Bk - 1], the last owns [0, B_last - 1]

Each boundary is a timestep `t`, or `snr:X` (the smallest timestep whose SNR on the run's actual schedule,
zero-terminal rescale included, is below X), or `logsnr:X` (the same with the natural log of the SNR).
SNR falls as t grows, so "the smallest t below X" is where the high-noise expert takes over; Wan 2.2 picks
its expert boundary this way. The two-expert recipe (`--refiner_training_strength 0.35`) is the plan with
one boundary, `--mixture_boundaries 350`.

Who trains at each step of a joint job (`--mixture_schedule`):

- `alternate`: the experts take turns in chain order, `--mixture_switch_every` steps each;
- `proportional`: each expert gets a share of steps equal to its share of the timesteps, spread evenly
  (at every step the expert furthest behind its share trains; ties go to the earlier expert);
- `timestep`: each step draws one timestep uniformly from [0, N - 1] with the run's seed, and the expert
  that owns it trains the batch (a random schedule with the proportional shares on average).

Every rule is a pure function of the plan and the seed, so the owner of any step is known before the
first one: the job's learning-rate schedules, checkpoints and resumes need no extra state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from expertune.experts import ExpertBand
from expertune.schedule import signal_to_noise_ratio

MIXTURE_SCHEDULES: tuple[str, ...] = ("alternate", "proportional", "timestep")
BOUNDARY_KINDS: tuple[str, ...] = ("t", "snr", "logsnr")

T = TypeVar("T")


@dataclass(frozen=True)
class Boundary:
    """One boundary of a plan as written: a timestep, or an SNR (or log-SNR) threshold."""

    kind: str  # one of BOUNDARY_KINDS
    value: float
    text: str

    def timestep(self, alphas_cumprod: torch.Tensor) -> int:
        """The first timestep of the expert above this boundary, on the schedule `alphas_cumprod`."""
        n = len(alphas_cumprod)
        if self.kind == "t":
            return int(self.value)
        snr = snr_of(alphas_cumprod)
        values = snr.log() if self.kind == "logsnr" else snr
        below = torch.nonzero(values < self.value).flatten()
        if below.numel() == 0:
            lowest = float(values[-1])
            raise ValueError(f"boundary {self.text!r}: no timestep of the schedule has {self.kind} below "
                             f"{self.value:g} (the lowest is {lowest:.4g} at t = {n - 1})")
        return int(below[0])


def snr_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t) in float64 (0 at a zero-terminal-SNR last step)."""
    return signal_to_noise_ratio(alphas_cumprod.double())


def parse_boundary(text: str) -> Boundary:
    """`"350"`, `"snr:0.25"` or `"logsnr:-1.4"` → Boundary; ValueError naming the text otherwise."""
    written = text.strip()
    kind, _, number = written.rpartition(":")
    kind = kind.strip().lower() or "t"
    if kind not in BOUNDARY_KINDS:
        raise ValueError(f"mixture boundary {written!r}: {kind!r} is not a kind of boundary; write a timestep "
                         "(350), snr:X or logsnr:X")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"mixture boundary {written!r}: {number.strip()!r} is not a number") from None
    if kind == "t" and (not value.is_integer() or value < 1):
        raise ValueError(f"mixture boundary {written!r}: a timestep boundary is a whole number >= 1")
    if kind == "snr" and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"mixture boundary {written!r}: an SNR threshold is a positive number")
    if not math.isfinite(value):
        raise ValueError(f"mixture boundary {written!r}: the threshold must be finite")
    return Boundary(kind, value, written)


def parse_boundaries(text: str) -> list[Boundary]:
    """The comma-separated list of `--mixture_boundaries` (highest first), syntax only."""
    parts = [p for p in str(text).split(",")]
    if not parts or any(not p.strip() for p in parts):
        raise ValueError(f"mixture_boundaries={text!r}: expected a comma-separated list such as '700,350' or "
                         "'snr:0.5,snr:5', with no empty entries")
    return [parse_boundary(p) for p in parts]


def plan_bands(text: str, alphas_cumprod: torch.Tensor) -> list[ExpertBand]:
    """The experts' bands, in chain order (highest noise first), for the boundaries `text` on a schedule.

    Refuses boundaries that are out of order, equal (an empty band) or outside [1, N - 1], naming each
    boundary with the timestep it resolved to.
    """
    n = len(alphas_cumprod)
    boundaries = parse_boundaries(text)
    cuts = [b.timestep(alphas_cumprod) for b in boundaries]
    shown = ", ".join(b.text if b.kind == "t" else f"{b.text} (t = {t})" for b, t in zip(boundaries, cuts))
    for boundary, cut in zip(boundaries, cuts):
        if not 1 <= cut <= n - 1:
            raise ValueError(f"mixture_boundaries {shown}: {boundary.text} falls at t = {cut}, outside [1, {n - 1}] "
                             f"(each expert needs at least one timestep of the {n})")
    for (upper, high), (lower, low) in zip(zip(boundaries, cuts), zip(boundaries[1:], cuts[1:])):
        if low >= high:
            what = "an empty band" if low == high else "bands out of order"
            raise ValueError(f"mixture_boundaries {shown}: {lower.text} (t = {low}) is not below {upper.text} "
                             f"(t = {high}): {what}; list the boundaries highest timestep first, each strictly below "
                             "the one before (SNR thresholds therefore rise: snr:0.5,snr:5)")
    edges = [n, *cuts, 0]
    return [ExpertBand(edges[k + 1], edges[k] - 1, n) for k in range(len(edges) - 1)]


def per_expert(text: str | None, count: int, name: str, parse: Callable[[str], T], default: T) -> list[T]:
    """An option with one value per expert (`a,b,c`) or one for all (`a`); unset → `default` for all."""
    if text is None:
        return [default] * count
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, count):
        raise ValueError(f"{name}={text!r} has {len(parts)} values for {count} experts: give one value for all, "
                         f"or exactly {count} (one per expert, in chain order)")
    values = []
    for part in parts:
        try:
            values.append(parse(part))
        except ValueError as error:
            raise ValueError(f"{name}={text!r}: {part!r} is not valid ({error})") from None
    return values * count if len(values) == 1 else values


def step_owners(rule: str, bands: Sequence[ExpertBand], total_steps: int, *, switch_every: int = 1,
                seed: int = 0) -> list[int]:
    """The expert (index in chain order) that trains each job step 1..total_steps, under `rule`."""
    count = len(bands)
    if rule == "alternate":
        return [(step // switch_every) % count for step in range(total_steps)]
    if rule == "proportional":
        n = bands[0].num_train_timesteps
        share = [band.size / n for band in bands]
        done = [0] * count
        owners = []
        for step in range(total_steps):
            behind = [share[k] * (step + 1) - done[k] for k in range(count)]
            chosen = max(range(count), key=lambda k: (behind[k], -k))
            done[chosen] += 1
            owners.append(chosen)
        return owners
    if rule == "timestep":
        n = bands[0].num_train_timesteps
        drawn = torch.randint(0, n, (total_steps,), generator=torch.Generator().manual_seed(seed)).tolist()
        return [owner_of(int(t), bands) for t in drawn]
    raise ValueError(f"mixture_schedule {rule!r} is not one of: {', '.join(MIXTURE_SCHEDULES)}")


def owner_of(timestep: int, bands: Sequence[ExpertBand]) -> int:
    """The index of the band that holds `timestep`."""
    for index, band in enumerate(bands):
        if band.lo <= timestep <= band.hi:
            return index
    raise ValueError(f"timestep {timestep} is in none of the bands {', '.join(map(str, bands))}")


def steps_per_expert(owners: Sequence[int], count: int) -> list[int]:
    """How many optimizer steps each expert takes in a job whose steps are owned by `owners`."""
    return [sum(1 for owner in owners if owner == k) for k in range(count)]


def widened_bands(bands: Sequence[ExpertBand], kind: str, margin: float, alphas_cumprod: torch.Tensor) -> list[ExpertBand]:
    """Each band widened across its boundaries by `margin` (`kind` "t": timesteps; "logsnr": natural log-SNR on the
    schedule `alphas_cumprod`), inside [0, N - 1]: what each expert trains on with an overlap. ValueError when a
    widened band would reach past its neighbour's whole band."""
    logsnr = snr_of(alphas_cumprod).log()
    lows, highs = [band.lo for band in bands], [band.hi for band in bands]
    for k in range(len(bands) - 1):  # the boundary between band k (above) and band k + 1 (below)
        upper, lower = bands[k], bands[k + 1]
        if kind == "t":
            down, up = upper.lo - int(margin), lower.hi + int(margin)
        else:
            reach_down = torch.nonzero(logsnr[: upper.lo] - logsnr[upper.lo] <= margin).flatten()
            reach_up = torch.nonzero(logsnr[lower.hi] - logsnr[lower.hi + 1:] <= margin).flatten()
            down = int(reach_down[0]) if reach_down.numel() else upper.lo
            up = lower.hi + 1 + int(reach_up[-1]) if reach_up.numel() else lower.hi
        if down <= lower.lo or up >= upper.hi:
            raise ValueError(f"an overlap of {margin:g} {'timesteps' if kind == 't' else 'in log-SNR'} at the boundary "
                             f"t = {upper.lo} widens {upper} down to t = {down} and {lower} up to t = {up}: wider than a "
                             f"neighbouring band ({lower.size} and {upper.size} timesteps)")
        lows[k], highs[k + 1] = down, up
    return [ExpertBand(lo, hi, band.num_train_timesteps) for lo, hi, band in zip(lows, highs, bands)]
