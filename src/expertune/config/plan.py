"""The mixture plan as one typed value: read from the config's mixture options and checked when the config is read.

`MixturePlan.from_values(values, sources)` parses `--mixture_boundaries`, the rule of who trains when, the shared
start (`--mixture_shared_steps`) and every per-expert option, and refuses a plan that does not fit before any model
loads, naming the option and the fix. Where a boundary falls on the noise schedule (`snr:X`, the top band's width)
needs the model's scheduler config; `MixturePlan.bands` checks that as soon as the schedule is known (before the
model's weights load, `train.setup`).

Per-expert options are declared in one table, `PER_EXPERT`: each names the shared option it overrides per expert.
An entry is parsed and checked exactly as the shared option is (its type, choices and bounds, `coerce_value`), an
empty entry or an unset list means the shared option's value, and `ExpertSettings` holds one resolved value per
row — the expert's own settings, never "None: use the run's". A new per-expert option is one row here and one
field of `ExpertSettings` with the shared option's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch

from expertune.config.schema import TrainConfig
from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.mixture import Boundary, parse_boundaries, plan_bands, step_owners, widened_bands

# Per-expert option → the shared option it overrides (one value per expert in chain order, or one for all).
PER_EXPERT: dict[str, str] = {
    "expert_models": "pretrained_model_name_or_path",
    "expert_learning_rates": "learning_rate",
    "expert_loss_weightings": "loss_weighting",
    "expert_ema_decays": "ema_decay",
}


@dataclass(frozen=True)
class ExpertSettings:
    """One expert's resolved settings: each field is named after the shared option it overrides (`PER_EXPERT`)."""

    pretrained_model_name_or_path: str  # the model the expert starts from
    learning_rate: float
    loss_weighting: str | None  # as the loss_weighting option: unset is min_snr with snr_gamma, else none
    ema_decay: float

    @classmethod
    def shared(cls, values: Mapping[str, Any]) -> ExpertSettings:
        """The settings of an expert that overrides nothing: the shared options' values (a single-expert run)."""
        given = {f.name: values[f.name] for f in fields(cls)}
        return cls(**{**given, "pretrained_model_name_or_path": given["pretrained_model_name_or_path"] or ""})

    def overrides(self) -> dict[str, Any]:
        """The shared options this expert overrides, by name, with its values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def model(self) -> str:
        return self.pretrained_model_name_or_path

    def applied_to(self, train: TrainConfig) -> TrainConfig:
        """The training section as this expert's optimizer, LR schedule and EMA use it: its overrides applied."""
        names = {f.name for f in fields(TrainConfig)}
        return replace(train, **{k: v for k, v in self.overrides().items() if k in names})


if {f.name for f in fields(ExpertSettings)} != set(PER_EXPERT.values()):  # pragma: no cover (a declaration error)
    raise AssertionError("ExpertSettings must have exactly one field per PER_EXPERT row")


@dataclass(frozen=True)
class SharedSteps:
    """`--mixture_shared_steps`: a number of job steps (`400`) or a fraction of the run's steps (`0.25`)."""

    text: str
    steps: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> SharedSteps:
        written = text.strip()
        try:
            number = float(written)
        except ValueError:
            raise ConfigError(f"mixture_shared_steps={text!r} is not a number: give job steps (400) or a fraction of "
                              "the run's steps (0.25)") from None
        if 0 < number < 1:
            return cls(written, fraction=number)
        if number >= 1 and number.is_integer():
            return cls(written, steps=int(number))
        raise ConfigError(f"mixture_shared_steps={text!r}: give a whole number of job steps >= 1 (400) or a fraction "
                          "between 0 and 1 of the run's steps (0.25)")

    def resolve(self, total_steps: int) -> int:
        """The shared phase's job steps in a run of `total_steps`; ConfigError when it leaves the experts none."""
        steps = self.steps if self.steps is not None else round(float(self.fraction or 0) * total_steps)
        if steps >= total_steps:
            raise ConfigError(f"mixture_shared_steps={self.text} is {steps} job steps, not shorter than the run "
                              f"({total_steps} steps): the experts would never train apart. Use fewer shared steps "
                              "(or a fraction such as 0.25), or raise --max_train_steps")
        return max(steps, 0)


@dataclass(frozen=True)
class Overlap:
    """`--mixture_overlap`: the margin each expert's training band reaches across each of its boundaries, in
    timesteps (`50`) or in natural log-SNR (`snr:0.5`)."""

    text: str
    kind: str  # "t" | "logsnr"
    margin: float

    @classmethod
    def parse(cls, text: str) -> Overlap:
        written = text.strip()
        kind, _, number = written.rpartition(":")
        kind = kind.strip().lower()
        if kind not in ("", "snr", "logsnr"):
            raise ConfigError(f"mixture_overlap={text!r}: write a number of timesteps (50) or a log-SNR margin "
                              "(snr:0.5)")
        try:
            margin = float(number)
        except ValueError:
            raise ConfigError(f"mixture_overlap={text!r}: {number.strip()!r} is not a number") from None
        if not (margin > 0 and margin < float("inf")) or (not kind and not margin.is_integer()):
            raise ConfigError(f"mixture_overlap={text!r}: give a whole number of timesteps >= 1 (50) or a positive "
                              "log-SNR margin (snr:0.5)")
        return cls(written, "t" if not kind else "logsnr", margin)


@dataclass(frozen=True)
class MixturePlan:
    """Every expert of a joint job: where the boundaries fall, who trains when, and each expert's settings."""

    boundaries: tuple[Boundary, ...]
    experts: tuple[ExpertSettings, ...]  # chain order (0: the expert that starts from pure noise)
    schedule: str  # mixture_schedule
    switch_every: int
    offload_inactive: bool
    shared: SharedSteps | None = None  # a shared start before the split (item 2 of issue 22)
    overlap: Overlap | None = None  # each expert trains on its band widened by this margin (item 3 of issue 22)
    handoff_blend: int = 0  # validation's chain and mixture.json: a blended hand-off over this window (infer/handoff)
    datasets: tuple[tuple[str, ...], ...] = ()  # per-expert dataset ids (issue 22 item 5; empty: every dataset)

    @property
    def count(self) -> int:
        return len(self.experts)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> MixturePlan | None:
        """The plan of typed flat config values (None without `mixture_boundaries`), fully checked."""
        src = sources or {}
        text = values["mixture_boundaries"]
        if text is None:
            return None
        try:
            boundaries = tuple(parse_boundaries(text))
        except ValueError as error:
            raise ConfigError(f"invalid value for mixture_boundaries (from {src.get('mixture_boundaries', 'defaults')}): "
                              f"{error}") from None
        check_timestep_order(boundaries)
        count = len(boundaries) + 1
        columns = {field: per_expert_values(option, values, count, src) for option, field in PER_EXPERT.items()}
        columns["pretrained_model_name_or_path"] = [m or "" for m in columns["pretrained_model_name_or_path"]]
        experts = tuple(ExpertSettings(**{field: column[k] for field, column in columns.items()}) for k in range(count))
        for option in ("expert_ema_decays",):
            if values[option] is not None and not values["use_ema"]:
                raise ConfigError(f"{option}={values[option]!r} (from {src.get(option, 'defaults')}) needs use_ema: add "
                                  f"--use_ema, or drop {option}")
        for k, expert in enumerate(experts):
            if expert.loss_weighting == "min_snr" and values["snr_gamma"] is None:
                raise ConfigError(f"expert_loss_weightings={values['expert_loss_weightings']!r} gives expert {k} min_snr, "
                                  "which needs snr_gamma: add --snr_gamma=5, or choose another weighting for it")
        shared_text = values.get("mixture_shared_steps")
        shared = SharedSteps.parse(shared_text) if shared_text is not None else None
        if shared is not None and len({expert.model for expert in experts}) > 1:
            raise ConfigError(f"mixture_shared_steps={shared_text} trains one model before the experts branch from it, "
                              f"but expert_models={values['expert_models']!r} starts them from different models: drop "
                              "expert_models, or drop mixture_shared_steps")
        if shared is not None and values["max_train_steps"]:
            shared.resolve(int(values["max_train_steps"]))
        overlap_text = values.get("mixture_overlap")
        overlap = Overlap.parse(overlap_text) if overlap_text is not None else None
        if overlap is not None and overlap.kind == "t" and all(b.kind == "t" for b in boundaries):
            cuts = [int(b.value) for b in boundaries]  # every band's size but the top one's is known now
            for upper, lower in zip(cuts, [*cuts[1:], 0]):
                if overlap.margin >= upper - lower:
                    raise ConfigError(f"mixture_overlap={overlap.text} is wider than the band [{lower}, {upper - 1}] "
                                      f"({upper - lower} timesteps) of mixture_boundaries={text}: use an overlap below "
                                      f"{upper - lower}")
        blend = int(values.get("mixture_handoff_blend") or 0)
        if blend and all(b.kind == "t" for b in boundaries):
            cuts = [int(b.value) for b in boundaries]
            narrowest = min(upper - lower for upper, lower in zip(cuts, [*cuts[1:], 0]))
            if blend >= narrowest:
                raise ConfigError(f"mixture_handoff_blend={blend} is not shorter than the narrowest band of "
                                  f"mixture_boundaries={text} ({narrowest} timesteps): use a window below {narrowest}")
        return cls(boundaries, experts, values["mixture_schedule"], int(values["mixture_switch_every"]),
                   bool(values["mixture_offload_inactive"]), shared, overlap, blend)

    def model_sources(self, main: str | None, loaded_as: str) -> list[str]:
        """The model each expert starts from, the run's own model (`main`) named as it was loaded (`loaded_as`: a
        converted single file's folder)."""
        return [loaded_as if expert.model in ("", main) else expert.model for expert in self.experts]

    def bands(self, alphas_cumprod: torch.Tensor) -> list[ExpertBand]:
        """The experts' bands on the run's schedule, in chain order; ConfigError naming a boundary that does not fit."""
        try:
            return plan_bands(",".join(b.text for b in self.boundaries), alphas_cumprod)
        except ValueError as error:
            raise ConfigError(f"mixture plan: {error}") from None

    def training_bands(self, alphas_cumprod: torch.Tensor) -> list[ExpertBand]:
        """The bands the experts train on: their own, widened by the overlap; ConfigError when one does not fit."""
        bands = self.bands(alphas_cumprod)
        if self.overlap is None:
            return bands
        try:
            return widened_bands(bands, self.overlap.kind, self.overlap.margin, alphas_cumprod)
        except ValueError as error:
            raise ConfigError(f"mixture_overlap={self.overlap.text}: {error}; use a smaller overlap") from None

    def check_blend(self, bands: list[ExpertBand]) -> None:
        """`mixture_handoff_blend` against the bands on the schedule: a window shorter than every band."""
        narrowest = min(band.size for band in bands)
        if self.handoff_blend >= narrowest:
            raise ConfigError(f"mixture_handoff_blend={self.handoff_blend} is not shorter than the narrowest band "
                              f"({narrowest} timesteps): use a window below {narrowest}")

    def owners(self, bands: list[ExpertBand], total_steps: int, seed: int) -> list[int]:
        """The expert that trains each job step after the shared start (`mixture.step_owners`)."""
        return step_owners(self.schedule, bands, total_steps, switch_every=self.switch_every, seed=seed)


def check_timestep_order(boundaries: tuple[Boundary, ...]) -> None:
    """Timestep boundaries that are out of order or equal are refused without the schedule (SNR ones later)."""
    timesteps = [b for b in boundaries if b.kind == "t"]
    for upper, lower in zip(timesteps, timesteps[1:]):
        if lower.value >= upper.value:
            what = "an empty band" if lower.value == upper.value else "bands out of order"
            raise ConfigError(f"mixture_boundaries: {lower.text} is not below {upper.text}: {what}; list the "
                              "boundaries highest timestep first, each strictly below the one before")


def per_expert_values(option: str, values: Mapping[str, Any], count: int, sources: Mapping[str, str]) -> list[Any]:
    """One value per expert of the per-expert `option`: its entries parsed as the shared option is, an empty entry
    or an unset list meaning the shared option's value."""
    from expertune.config.schema import FIELDS
    from expertune.config.validate import coerce_value

    shared_name = PER_EXPERT[option]
    shared = values[shared_name]
    text = values[option]
    if text is None:
        return [shared] * count
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, count):
        raise ConfigError(f"{option}={text!r} (from {sources.get(option, 'defaults')}) has {len(parts)} values for "
                          f"{count} experts: give one value for all, or exactly {count} (one per expert, in chain "
                          "order; an empty entry keeps the shared --" + shared_name + ")")
    spec = FIELDS[shared_name]
    parsed = []
    for k, part in enumerate(parts):
        if part in ("", "default"):
            parsed.append(shared)
            continue
        try:
            parsed.append(coerce_value(spec, part, f"entry {k} of {option}"))
        except ConfigError as error:
            raise ConfigError(f"{option}={text!r}: {error}") from None
    return parsed * count if len(parsed) == 1 else parsed
