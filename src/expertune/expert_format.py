"""The expert format on disk: `expert.json` beside a saved pipeline (or LoRA adapters), read and written here only.

    {
      "format_version": 1,
      "timestep_range": [lo, hi],            the band, inclusive training timesteps
      "denoising_start": ..., "denoising_end": ...,   the same band as diffusers' pipeline arguments
      "num_train_timesteps": 1000, "prediction_type": ..., "rescale_betas_zero_snr": ...,
      "timestep_spacing": ..., ...           the parameterisation it was trained under (NoiseSchedule.describe)
      "model_type": "full" | "lora",         what the directory holds
      "base_model": "...",                   the model it was trained from (a LoRA expert loads onto it)
      "base_revision": ..., "base_variant": ...   its --revision / --variant, when given: the chain, validation's
                                             peer and the export read the base as it was trained on
      "weights": "trained" | "ema"           which weights were exported
      "training": {...}                      how it was trained, when not the defaults: loss type, timestep
                                             distribution, flips, adapter kind (issue 23; informative)
    }

`ExpertDescription.read` refuses a file of another `format_version`, naming both versions and the fix; an
expert written before `model_type`, `base_model` and `weights` existed reads with their defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand
from expertune.io_utils import atomic_write_json

EXPERT_FILE = "expert.json"
FORMAT_VERSION = 1
MODEL_TYPES = ("full", "lora")
WEIGHTS = ("trained", "ema")
# The formats an export writes (export/formats.py); the words of the export_format option.
FORMATS = ("diffusers", "single_file")
_BAND_KEYS = ("format_version", "timestep_range", "denoising_start", "denoising_end")
_OWN_KEYS = ("model_type", "base_model", "base_revision", "base_variant", "weights", "training",
             "training_timestep_range")
TRAINING_RANGE = "training_timestep_range"  # the band widened by --mixture_overlap, when the expert trained on more


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`"diffusers,single_file"` → the formats, in FORMATS order; ConfigError naming an unknown one."""
    names = [part.strip() for part in (text or "diffusers").split(",") if part.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"export_format {text!r}: {', '.join(unknown) or 'nothing'} is not a format; use a "
                          f"comma-separated list of {', '.join(FORMATS)}")
    return tuple(name for name in FORMATS if name in names)


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def check_format_version(version: Any, reads: int, what: str) -> None:
    """Refuse a file of another `format_version`, naming both versions and the fix (`what`: "X is an expert")."""
    if version != reads:
        newer = isinstance(version, int) and version > reads
        fix = "upgrade expertune to read it" if newer else "train it again with this expertune"
        raise ModelError(f"{what} of format_version {version!r}; this expertune reads format_version {reads}: {fix}")


@dataclass(frozen=True)
class ExpertDescription:
    """What an expert is: its band, the parameterisation it was trained under, and what was saved."""

    band: ExpertBand
    parameterisation: dict[str, Any] = field(default_factory=dict)  # NoiseSchedule.describe()
    model_type: str = "full"
    base_model: str | None = None
    weights: str = "trained"
    training: dict[str, Any] = field(default_factory=dict)  # issue 23: the training knobs, recorded
    training_band: ExpertBand | None = None  # the band it trained on, when wider than `band` (--mixture_overlap)
    base_revision: str | None = None  # the hub revision of base_model it was trained from (--revision)
    base_variant: str | None = None  # the weights-file variant of base_model (--variant), e.g. fp16

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "timestep_range": self.band.to_json(),
            "denoising_start": self.band.denoising_start,
            "denoising_end": self.band.denoising_end,
            **self.parameterisation,
            "model_type": self.model_type,
            "weights": self.weights,
        }
        if self.base_model is not None:
            document["base_model"] = self.base_model
        for key, value in (("base_revision", self.base_revision), ("base_variant", self.base_variant)):
            if value is not None:
                document[key] = value
        if self.training:
            document["training"] = self.training
        if self.training_band is not None:
            document[TRAINING_RANGE] = self.training_band.to_json()
        return document

    def write(self, directory: str | os.PathLike) -> Path:
        """`directory/expert.json`, written atomically."""
        path = Path(directory) / EXPERT_FILE
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, document: dict[str, Any], source: str = EXPERT_FILE) -> ExpertDescription:
        check_format_version(document.get("format_version"), FORMAT_VERSION, f"{source} is an expert")
        try:
            lo, hi = document["timestep_range"]
            band = ExpertBand(int(lo), int(hi), int(document["num_train_timesteps"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{source} is not a valid expert description: {error}") from None
        model_type = document.get("model_type", "full")
        if model_type not in MODEL_TYPES:
            raise ModelError(f"{source}: model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        parameterisation = {k: v for k, v in document.items() if k not in _BAND_KEYS + _OWN_KEYS}
        base = document.get("base_model")
        training = document.get("training")
        return cls(band, parameterisation, model_type, None if base is None else str(base),
                   str(document.get("weights", "trained")), dict(training) if isinstance(training, dict) else {},
                   _training_band(document, band, source),
                   base_revision=_optional_text(document.get("base_revision")),
                   base_variant=_optional_text(document.get("base_variant")))

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ExpertDescription:
        """The description in `directory/expert.json`; ModelError naming the file when it is missing or bad."""
        path = Path(directory) / EXPERT_FILE
        if not path.is_file():
            raise ModelError(f"{directory} is not an expertune expert: {path} is missing")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"{path} is not a valid expert description: {error}") from None
        if not isinstance(document, dict):
            raise ModelError(f"{path} is not a valid expert description: not a JSON object")
        return cls.from_json(document, str(path))


def _training_band(document: dict[str, Any], band: ExpertBand, source: str) -> ExpertBand | None:
    """The `training_timestep_range` of an expert or mixture entry (None when absent), checked to hold the band."""
    if TRAINING_RANGE not in document:
        return None
    try:
        lo, hi = document[TRAINING_RANGE]
        wide = ExpertBand(int(lo), int(hi), band.num_train_timesteps)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{source}: {TRAINING_RANGE} is not a valid range: {error}") from None
    if wide.lo > band.lo or wide.hi < band.hi:
        raise ModelError(f"{source}: {TRAINING_RANGE} {wide} does not hold the expert's band {band}")
    return wide


def expert_summary(band: ExpertBand, parameterisation: dict[str, Any]) -> dict[str, Any]:
    """The band and parameterisation part of expert.json (what two experts must agree on to chain)."""
    return {
        "format_version": FORMAT_VERSION,
        "timestep_range": band.to_json(),
        "denoising_start": band.denoising_start,
        "denoising_end": band.denoising_end,
        **parameterisation,
    }


# ---- the mixture: OUTPUT_DIR/mixture.json ---------------------------------------------------------------
#
#     {
#       "format_version": 1,
#       "experts": [                            chain order: the first denoises from pure noise
#         {"path": "expert-0/pipeline", "timestep_range": [350, 999], "denoising_start": null,
#          "denoising_end": 0.65, "model_type": "full"},
#         ...
#       ],
#       "num_train_timesteps": 1000, "prediction_type": ..., ...   the parameterisation all experts share
#     }

MIXTURE_FILE = "mixture.json"
MIXTURE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class MixtureMember:
    """One expert of a mixture: where it is (relative to the mixture directory) and the band it owns."""

    path: str
    band: ExpertBand
    model_type: str = "full"
    training_band: ExpertBand | None = None  # the band it trained on, when wider than `band` (--mixture_overlap)
    base_revision: str | None = None  # the hub revision of base_model it was trained from (--revision)
    base_variant: str | None = None  # the weights-file variant of base_model (--variant), e.g. fp16

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "path": self.path, "timestep_range": self.band.to_json(), "denoising_start": self.band.denoising_start,
            "denoising_end": self.band.denoising_end, "model_type": self.model_type}
        if self.training_band is not None:
            document[TRAINING_RANGE] = self.training_band.to_json()
        return document


@dataclass(frozen=True)
class MixtureDescription:
    """A mixture of experts on disk: its experts in chain order and the parameterisation they share."""

    experts: tuple[MixtureMember, ...]
    parameterisation: dict[str, Any] = field(default_factory=dict)
    handoff_blend: int = 0  # the blended hand-off window `expertune generate --mixture` uses by default (0: none)

    def to_json(self) -> dict[str, Any]:
        document = {"format_version": MIXTURE_FORMAT_VERSION, "experts": [m.to_json() for m in self.experts],
                    **self.parameterisation}
        if self.handoff_blend:
            document["handoff_blend"] = self.handoff_blend
        return document

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MIXTURE_FILE
        atomic_write_json(path, self.to_json())
        return path

    def expert_dirs(self, directory: str | os.PathLike) -> list[Path]:
        return [Path(directory) / m.path for m in self.experts]

    @classmethod
    def read(cls, directory: str | os.PathLike) -> MixtureDescription:
        """The mixture in `directory/mixture.json`, checked: version, bands that tile the schedule in chain
        order, and each expert's own expert.json agreeing with its entry. ModelError names the problem."""
        from expertune.experts import partition_problems

        path = Path(directory) / MIXTURE_FILE
        if not path.is_file():
            raise ModelError(f"{directory} is not an expertune mixture: {path} is missing (a single expert has "
                             "expert.json instead: pass it with --expert)")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"{path} is not a valid mixture description: {error}") from None
        version = document.get("format_version") if isinstance(document, dict) else None
        check_format_version(version, MIXTURE_FORMAT_VERSION, f"{path} is a mixture")
        try:
            n = int(document["num_train_timesteps"])
            bands = [ExpertBand(int(e["timestep_range"][0]), int(e["timestep_range"][1]), n) for e in document["experts"]]
            members = tuple(MixtureMember(str(e["path"]), band, str(e.get("model_type", "full")),
                                          _training_band(e, band, str(path)))
                            for e, band in zip(document["experts"], bands))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ModelError(f"{path} is not a valid mixture description: {error}") from None
        if not members:
            raise ModelError(f"{path} lists no experts")
        problems = partition_problems([m.band for m in members])
        if [m.band for m in members] != sorted((m.band for m in members), key=lambda b: -b.hi):
            problems.append("experts are not listed in chain order (highest noise first)")
        if problems:
            raise ModelError(f"{path}: " + "; ".join(problems))
        for member in members:
            own = ExpertDescription.read(Path(directory) / member.path)
            if own.band != member.band:
                raise ModelError(f"{path}: expert {member.path} owns {own.band} by its expert.json, but the mixture "
                                 f"lists {member.band}")
        parameterisation = {k: v for k, v in document.items() if k not in ("format_version", "experts", "handoff_blend")}
        blend = document.get("handoff_blend", 0)
        if not isinstance(blend, int) or isinstance(blend, bool) or blend < 0:
            raise ModelError(f"{path}: handoff_blend {blend!r} is not a window of timesteps >= 0")
        return cls(members, parameterisation, blend)
