"""Value conversion, the unsupported-feature check and the cross-field checks.

Every error names the field, the value, where it came from and what is allowed. The features
expertune lacks are declared on their options (``opt(..., unsupported=Unsupported(...))`` in
config.schema); ``UNSUPPORTED`` is the list derived from them.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

from expertune.config.knobs_check import check_knobs
from expertune.config.schema import UNSUPPORTED, Config, FieldSpec
from expertune.errors import ConfigError, UnsupportedFeatureError
from expertune.resolution import resolution_problem

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_bool(text: str) -> bool | None:
    """``true/1/yes/on`` -> True, ``false/0/no/off`` -> False (any case), anything else -> None."""
    word = text.strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def suggest(word: str, candidates: Any) -> str:
    """A ``"; did you mean 'x'?"`` suffix when a candidate is close, else ``""``."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def show(value: Any) -> str:
    """A value as the user would write it (true/false, 1e-06, text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _bad(spec: FieldSpec, raw: Any, source: str, extra: str = "") -> ConfigError:
    return ConfigError(f"invalid value for {spec.name}: {show(raw)} (from {source}); "
                       f"expected {spec.allowed_text()}{extra}")


def coerce_value(spec: FieldSpec, raw: Any, source: str) -> Any:
    """Convert a raw value (text from config.env/CLI, or a TOML/JSON value) to the field's type.

    Checks choices, numeric bounds and the field's own validator. ``source`` is a phrase such as
    ``"command line"`` used in error messages.
    """
    if raw is None or (isinstance(raw, str) and raw == "" and spec.optional):
        if spec.optional:
            return None
        raise _bad(spec, raw, source)
    if spec.type is bool:
        return _coerce_bool(spec, raw, source)
    if spec.type is str:
        return _coerce_text(spec, raw, source)
    return _coerce_number(spec, raw, source)


def _coerce_bool(spec: FieldSpec, raw: Any, source: str) -> bool:
    value = raw if isinstance(raw, bool) else parse_bool(raw) if isinstance(raw, str) else None
    if value is None:
        raise _bad(spec, raw, source)
    return value


def _coerce_text(spec: FieldSpec, raw: Any, source: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)  # a JSON/TOML number where text is expected (validation_resolution = 1024)
    if not isinstance(raw, str):
        raise _bad(spec, raw, source)
    value = spec.aliases.get(raw, raw)
    if spec.choices and value not in spec.choices:
        raise _bad(spec, raw, source, suggest(value, spec.choices))
    if spec.check is not None:
        try:
            spec.check(value)
        except ConfigError as exc:
            raise ConfigError(f"invalid value for {spec.name} (from {source}): {exc}") from None
    return value


def _coerce_number(spec: FieldSpec, raw: Any, source: str) -> float | None:
    """An int or float field's value (an int for int fields); None for 0 where 0 means unset."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _bad(spec, raw, source)
    try:
        if spec.type is int:
            if isinstance(raw, float):
                raise ValueError
            value: float = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise _bad(spec, raw, source) from None
    if not math.isfinite(value):
        raise _bad(spec, raw, source)
    if spec.zero_is_none and value == 0:
        return None
    ok = ((spec.ge is None or value >= spec.ge) and (spec.gt is None or value > spec.gt)
          and (spec.le is None or value <= spec.le) and (spec.lt is None or value < spec.lt))
    if not ok:
        raise _bad(spec, raw, source)
    return value


def check_unsupported(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Raise UnsupportedFeatureError listing every requested feature expertune lacks."""
    problems = [
        f"{row.name}={show(values[row.name])} (from {sources.get(row.name, 'defaults')}) is not "
        f"supported: {row.message}"
        for row in UNSUPPORTED if row.applies(values[row.name])
    ]
    if len(problems) == 1:
        raise UnsupportedFeatureError(problems[0])
    if problems:
        raise UnsupportedFeatureError("unsupported settings:\n  " + "\n  ".join(problems))


def check_cross_fields(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Checks that involve more than one field."""
    def src(name: str) -> str:
        return sources.get(name, "defaults")

    if values["refiner_training_invert_schedule"] and not values["refiner_training"]:
        raise ConfigError(
            f"refiner_training_invert_schedule (from {src('refiner_training_invert_schedule')}) needs "
            "refiner_training: add --refiner_training (the inverted schedule trains the base expert's "
            "high-noise band of a refiner_training split)")
    resolution, resolution_type = values["resolution"], values["resolution_type"]
    problem = resolution_problem(resolution, resolution_type, bucket_edge=False)
    if problem == "megapixels":
        raise ConfigError(
            f"resolution={show(resolution)} (from {src('resolution')}) with resolution_type=area "
            f"(from {src('resolution_type')}) means {show(resolution)} megapixels; give megapixels "
            "(1.0 is about 1024 x 1024) or use resolution_type=pixel_area for an edge in pixels")
    if problem == "whole_pixels":
        raise ConfigError(
            f"resolution={show(resolution)} (from {src('resolution')}) is not a whole number of pixels >= 8 "
            f"as resolution_type={resolution_type} (from {src('resolution_type')}) needs; give pixels, or "
            "use resolution_type=area for megapixels")
    if values["timestep_range"] is not None and values["refiner_training"]:
        raise ConfigError(
            f"timestep_range={show(values['timestep_range'])} (from {src('timestep_range')}) and "
            f"refiner_training (from {src('refiner_training')}) both choose the timestep band; use one")
    check_mixture_fields(values, sources)
    check_knobs(values, sources)  # issue 23
    if values["push_to_hub"] and not values["hub_model_id"]:  # issue 19, hub helper
        raise ConfigError(f"push_to_hub (from {src('push_to_hub')}) needs hub_model_id: add --hub_model_id=NAME "
                          "(HUB_MODEL_NAME in config.env), `owner/name` or a name under your hub account")
    if values["export_ema"] and not values["use_ema"]:
        raise ConfigError(
            f"export_ema (from {src('export_ema')}) needs use_ema: add --use_ema, or drop --export_ema")
    if values["optimizer"] == "adamw_bf16" and values["mixed_precision"] != "bf16":
        raise ConfigError(
            f"optimizer=adamw_bf16 (from {src('optimizer')}) trains bfloat16 weights and needs "
            f"mixed_precision=bf16, not {show(values['mixed_precision'])} (from {src('mixed_precision')}); "
            "set MIXED_PRECISION=bf16 (--mixed_precision=bf16), or use --optimizer=adamw")
    if values["pure_bf16"] and values["optimizer"] != "adamw_bf16":
        raise ConfigError(
            f"pure_bf16 (from {src('pure_bf16')}) holds the trained weights in bfloat16, which only "
            f"optimizer=adamw_bf16 updates without losing small steps; optimizer is {show(values['optimizer'])} "
            f"(from {src('optimizer')}): set OPTIMIZER=adamw_bf16, or PURE_BF16=false to train float32 weights")
    weighting, gamma = values["loss_weighting"], values["snr_gamma"]
    if weighting == "min_snr" and gamma is None:
        raise ConfigError(f"loss_weighting=min_snr (from {src('loss_weighting')}) needs snr_gamma: add "
                          "--snr_gamma=5 (MIN_SNR_GAMMA=5)")
    if weighting in ("none", "debiased") and gamma is not None:
        raise ConfigError(
            f"loss_weighting={weighting} (from {src('loss_weighting')}) and snr_gamma={show(gamma)} (from "
            f"{src('snr_gamma')}) ask for two weightings; drop snr_gamma (MIN_SNR_GAMMA) or use "
            "loss_weighting=min_snr")
    if values["eval_dataset_id"] is not None and values["eval_holdout_fraction"] is not None:
        raise ConfigError(
            f"eval_dataset_id={show(values['eval_dataset_id'])} (from {src('eval_dataset_id')}) and "
            f"eval_holdout_fraction={show(values['eval_holdout_fraction'])} (from {src('eval_holdout_fraction')}) "
            "both choose the held-out images; use one")


def check_mixture_fields(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """A mixture plan chooses every expert's band itself; per-expert lists need a plan."""
    def src(name: str) -> str:
        return sources.get(name, "defaults")

    plan = values["mixture_boundaries"]
    if plan is not None:
        for other in ("refiner_training", "timestep_range"):
            if values[other] not in (None, False):
                raise ConfigError(
                    f"mixture_boundaries={show(plan)} (from {src('mixture_boundaries')}) gives every expert its "
                    f"band, and {other} (from {src(other)}) would choose one band for a single expert: drop "
                    f"{other}, or drop mixture_boundaries to train one expert")
        from expertune.config.plan import MixturePlan  # issue 22: the whole plan, checked before any model loads

        MixturePlan.from_values(values, sources)
        return
    from expertune.config.plan import PER_EXPERT

    if values.get("mixture_handoff_blend"):
        raise ConfigError(f"mixture_handoff_blend={values['mixture_handoff_blend']} (from "
                          f"{src('mixture_handoff_blend')}) blends the hand-offs of a mixture, but mixture_boundaries is "
                          "unset: add --mixture_boundaries, or drop mixture_handoff_blend")
    for name in (*PER_EXPERT, "mixture_shared_steps", "mixture_overlap"):
        if values[name] is not None:
            raise ConfigError(f"{name}={show(values[name])} (from {src(name)}) sets a value per expert of a "
                              "mixture, but mixture_boundaries is unset: add --mixture_boundaries (e.g. 350 for "
                              f"two experts), or drop {name}")


def validate_values(values: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    """Typed flat values (all fields) -> Config, after the unsupported and cross-field checks."""
    check_unsupported(values, sources)
    check_cross_fields(values, sources)
    return Config.from_flat(dict(values))
