"""The typed configuration: one frozen dataclass per concern, one line of doc per field.

Every field name is globally unique and equals the user's flag name (without ``--``), so the
nested sections also have a flat view (``Config.flat()``). Field metadata carries the doc line,
the allowed values, numeric bounds, the config.env variable names that set the field, whether
training needs it, the values expertune refuses (and why) and what resuming does when it changed.
``FIELDS`` is the registry built from the dataclasses; every list of options (the required ones, the
unsupported values, docs/configuration.md and `expertune train --help`) is derived from it.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from expertune.config.simpletuner_flags import ENV_NAMES
from expertune.errors import ConfigError
from expertune.io_utils import default_cache_dir  # noqa: F401  (re-exported: config.default_cache_dir)
from expertune.resolution import RESOLUTION_TYPES
from expertune.schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS

if TYPE_CHECKING:
    from expertune.config.plan import MixturePlan

_META_KEY = "expertune"


# The CLIP model users get for --evaluation_type clip unless they name one (a hub id; tests pass a local one).
DEFAULT_EVALUATION_MODEL = "openai/clip-vit-large-patch14"


def parse_timestep_range(text: str) -> tuple[int, int]:
    """`experts.parse_timestep_range`, raising ConfigError: the check of the `timestep_range` option."""
    from expertune.experts import parse_timestep_range as parse

    try:
        return parse(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def parse_validation_resolutions(text: str) -> list[tuple[int, int]]:
    """`validation_resolution` as (width, height) pairs: "1024", "1024x1024" or several comma-separated
    (SimpleTuner's spellings); ConfigError naming the bad part."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        width, _, height = part.lower().partition("x")
        try:
            size = (int(width), int(height or width))
        except ValueError:
            raise ConfigError(f"{part!r} is not a size: write 1024 or 1024x1024 (WxH), comma-separated for "
                              "several") from None
        if min(size) < 8 or size[0] % 8 or size[1] % 8:
            raise ConfigError(f"{part!r}: width and height must be multiples of 8, at least 8")
        sizes.append(size)
    return sizes


# The optimizers `train.optim.build_optimizer` builds; every list of them in messages and docs is this one.
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw8bit", "adafactor", "prodigy")


def required(value: str | None, name: str) -> str:
    """A setting `Config.require(...)` has checked is set, narrowed to str (ConfigError naming it, should it not
    be)."""
    if value is None:
        raise ConfigError(f"{name} is unset: set --{name}")
    return value


# What a resumed run may do with an option that differs from its checkpoint's: "refused" (it would change the
# run), "may_change" (accepted with --allow_config_change), "not_compared" (how a run is started, not what it is).
RESUME_RULES = ("refused", "may_change", "not_compared")
# Sections whose options all may change on resume unless they say otherwise.
MAY_CHANGE_SECTIONS = ("validation", "logging")


def section_resume_rule(section: str) -> str:
    """The resume rule of an option of `section` that states none (RESUME_RULES)."""
    return "may_change" if section in MAY_CHANGE_SECTIONS else "refused"


@dataclass(frozen=True)
class Unsupported:
    """Values of an option that expertune lacks the feature for: asking for one stops the run with `message`.

    When the feature lands, delete the option's ``unsupported=`` (docs/configuration.md is regenerated from it).
    """

    when: str  # the triggering values, in words (docs)
    applies: Callable[[Any], bool]
    message: str  # what to do instead / what IS supported
    name: str = ""  # the option; filled in from the field that declares it


def _is_true(value: Any) -> bool:
    return value is True


def opt(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    env: tuple[str, ...] = (),
    env_true_value: str | None = None,
    aliases: dict[str, str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    zero_is_none: bool = False,
    check: Callable[[Any], Any] | None = None,
    on_resume: str | None = None,
    required_for_training: bool = False,
    unsupported: Unsupported | None = None,
) -> Any:
    """Declare a config field with its metadata (see FieldSpec for the meaning of each)."""
    assert on_resume in (None, *RESUME_RULES), on_resume
    meta = dict(doc=doc, choices=choices, env=env, env_true_value=env_true_value,
                aliases=dict(aliases or {}), ge=ge, gt=gt, le=le, lt=lt,
                zero_is_none=zero_is_none, check=check, on_resume=on_resume,
                required_for_training=required_for_training, unsupported=unsupported)
    return field(default=default, metadata={_META_KEY: meta})


@dataclass(frozen=True)
class FieldSpec:
    """Everything known about one option. ``type`` is str, int, float or bool."""

    name: str
    section: str
    type: type
    optional: bool
    default: Any
    doc: str
    choices: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    env_true_value: str | None = None  # env var is a boolean; true sets the field to this value
    aliases: dict[str, str] = field(default_factory=dict)  # accepted spelling -> canonical value
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    zero_is_none: bool = False  # 0 means "unset" (SimpleTuner habit)
    check: Callable[[Any], Any] | None = None  # extra validator; raises ConfigError
    on_resume: str | None = None  # RESUME_RULES; None: "may_change" in MAY_CHANGE_SECTIONS, else "refused"
    required_for_training: bool = False  # `expertune train` refuses to start while it is unset
    unsupported: Unsupported | None = None  # values refused because expertune lacks the feature

    @property
    def resume_rule(self) -> str:
        """What resuming does when this option differs from the checkpoint's (one of RESUME_RULES)."""
        if self.on_resume is not None:
            return self.on_resume
        return section_resume_rule(self.section)

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (", optional" if self.optional else "")

    def allowed_text(self) -> str:
        """What values are allowed, in words (used in error messages and the docs)."""
        if self.type is bool:
            return "true or false"
        if self.choices:
            text = "one of: " + ", ".join(self.choices)
        elif self.name == "timestep_range":
            text = "'LO,HI' with integers 0 <= LO <= HI"
        elif self.type is str:
            text = "any text"
        else:
            text = {int: "integer", float: "number"}[self.type]
            lo = f"{'>=' if self.ge is not None else '>'} {_num(self.ge if self.ge is not None else self.gt)}"
            hi = f"{'<=' if self.le is not None else '<'} {_num(self.le if self.le is not None else self.lt)}"
            has_lo = self.ge is not None or self.gt is not None
            has_hi = self.le is not None or self.lt is not None
            if has_lo and has_hi:
                left = "[" if self.ge is not None else "("
                right = "]" if self.le is not None else ")"
                lo_v = self.ge if self.ge is not None else self.gt
                hi_v = self.le if self.le is not None else self.lt
                text += f" in {left}{_num(lo_v)}, {_num(hi_v)}{right}"
            elif has_lo:
                text += f" {lo}"
            elif has_hi:
                text += f" {hi}"
        if self.aliases:
            text += " (" + ", ".join(f"{a} = {c}" for a, c in self.aliases.items()) + ")"
        if self.zero_is_none:
            text += "; 0 means unset"
        return text


def _num(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

SPACINGS = TIMESTEP_SPACINGS  # one list, in schedule.py


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained model and how its weights are trained."""

    pretrained_model_name_or_path: str | None = opt(
        None, "Local diffusers directory or Hugging Face hub id of the SDXL-family model to start from.",
        env=("MODEL_NAME",), required_for_training=True)
    model_family: str = opt("sdxl", "Model architecture family.", choices=("sdxl",), env=("MODEL_FAMILY",))
    model_type: str = opt("full", "Train the full UNet weights (full) or adapters (lora).",
                          choices=("full", "lora"), env=("MODEL_TYPE",))
    # -- issue 23 (knobs): DoRA and the LyCORIS adapters peft provides (models/adapters.py) ----------------------
    use_dora: bool = opt(False, "Train DoRA adapters (model_type=lora, lora_type=standard): LoRA plus a learned "
                                "magnitude per output feature; often closer to a full fine-tune at the same rank, "
                                "slower per step.", env=("USE_DORA",))
    layer_freeze_strategy: str = opt("none", "Which UNet weights to freeze.", choices=("none", "bitfit"),
                                     env=("USE_BITFIT",), env_true_value="bitfit", unsupported=Unsupported(
        "`bitfit`", lambda v: v == "bitfit", "BitFit freezing is not supported; expertune trains all UNet weights "
        "(model_type=full) or LoRA adapters (model_type=lora): use layer_freeze_strategy=none (USE_BITFIT=false)"))
    lora_type: str = opt("standard", "Kind of adapter (model_type=lora): standard (peft LoRA, or DoRA with "
                                     "use_dora) or lycoris (LoRA, LoHa or LoKr as lycoris_config's algo says).",
                         choices=("standard", "lycoris"), env=("LORA_TYPE",))
    lycoris_config: str | None = opt(None, "JSON file of lora_type=lycoris: its algo (lora, loha or lokr), "
                                           "linear_dim (rank), linear_alpha, factor (lokr) ... (docs/knobs.md lists "
                                           "the fields).")
    lora_rank: int = opt(16, "Rank of the LoRA adapters (model_type=lora).", ge=1)
    lora_alpha: float | None = opt(None, "LoRA scaling alpha (unset: equal to lora_rank, a scale of 1).", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path during training.", ge=0, lt=1)
    lora_target_modules: str = opt("to_k,to_q,to_v,to_out.0",
                                   "Comma-separated UNet module names that get LoRA adapters (peft target_modules).")
    # -- issue 23 (knobs): a quantised frozen base under LoRA experts (models/quantize.py) ------------------------
    base_model_precision: str = opt("no_change", "Quantisation of the frozen base under LoRA experts: no_change, or "
                                    "int8-torchao (the UNet's Linear weights in int8, about half of bf16's memory; "
                                    "CPU and CUDA). SimpleTuner's other values are refused with their reason.",
                                    env=("BASE_MODEL_PRECISION",))
    mixed_precision: str = opt("no", "Autocast precision for the forward pass; trained weights stay float32 "
                                     "(except with optimizer=adamw_bf16).",
                               choices=("no", "bf16", "fp16"), env=("MIXED_PRECISION",))
    pure_bf16: bool = opt(False, "SimpleTuner's PURE_BF16: hold the trained weights in bfloat16 with no float32 "
                                 "copy; needs optimizer=adamw_bf16 (which always does so) and mixed_precision=bf16.",
                          env=("PURE_BF16",))
    allow_tf32: bool = opt(False, "Let float32 matmuls on a CUDA GPU use TF32 tensor cores (faster, ~10-bit "
                                  "mantissa); cuDNN convolutions keep PyTorch's default (TF32); no effect "
                                  "elsewhere.", env=("ALLOW_TF32",))
    dynamo_backend: str = opt("no", "torch.compile the trained UNet with this TorchDynamo backend (no: eager). "
                                    "Refused where the backend cannot run (inductor needs a C++ compiler).",
                              choices=("no", "inductor", "eager", "aot_eager", "cudagraphs"),
                              aliases={"none": "no", "false": "no"}, env=("TRAINING_DYNAMO_BACKEND",))
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the pretrained model.")
    variant: str | None = opt(None, "Weights-file variant of the pretrained model, e.g. fp16.")
    # -- issue 19 (export): community single-file checkpoints in ----------------------------------------------
    single_file_config: str | None = opt(None, "A diffusers folder of the same family whose configs and tokenizers "
                                         "describe a single-file .safetensors pretrained model (default: the shipped "
                                         "SDXL / SSD-1B / refiner configs with the tokenizers from the HF cache).")


_ALWAYS_CACHED = Unsupported("`true`", _is_true, "expertune always pre-computes and caches text embeddings; "
                             "remove it")


@dataclass(frozen=True)
class DataConfig:
    """Datasets, buckets and the embedding caches."""

    data_backend_config: str | None = opt(None, "Path of the dataloader JSON file (list of datasets).",
                                          env=("DATALOADER_CONFIG",), required_for_training=True)
    resolution: float = opt(1024, "Training resolution of datasets that set none: pixels of the shorter edge "
                                  "(pixel), megapixels (area) or pixels of an equal-area square's edge "
                                  "(pixel_area).", gt=0, env=("RESOLUTION",))
    resolution_type: str = opt("pixel", "How resolution is measured, for datasets that set none.",
                               choices=RESOLUTION_TYPES, env=("RESOLUTION_TYPE",))
    minimum_image_size: float | None = opt(None, "Skip images smaller than this, in the unit of resolution_type "
                                                 "(datasets that set none; 0 or unset: no minimum).",
                                           ge=0, env=("MINIMUM_RESOLUTION",))
    aspect_bucket_rounding: int | None = opt(None, "Decimal places the aspect-bucket ratios are rounded to.",
                                             ge=0, env=("ASPECT_BUCKET_ROUNDING",))
    caption_dropout_probability: float = opt(0.0, "Probability of training a sample with an empty caption.",
                                             ge=0, le=1, env=("CAPTION_DROPOUT_PROBABILITY",))
    vae_batch_size: int = opt(4, "Images per batch when encoding the VAE latent cache.", ge=1,
                              env=("VAE_BATCH_SIZE",), on_resume="may_change")
    text_encoder_batch_size: int = opt(8, "Captions per batch when encoding the text-embedding cache.", ge=1,
                                       env=("TEXT_ENCODER_BATCH_SIZE",), on_resume="may_change")
    read_batch_size: int | None = opt(None, "SimpleTuner's cache read batch size: accepted and has no effect "
                                            "(expertune reads each cache entry when a batch needs it).", ge=1,
                                      env=("READ_BATCH_SIZE",))
    write_batch_size: int | None = opt(None, "SimpleTuner's cache write batch size: accepted and has no effect "
                                             "(expertune writes each cache entry as it is encoded).", ge=1,
                                       env=("WRITE_BATCH_SIZE",))
    text_cache_ondemand: bool = opt(False, "Encode captions during training instead of caching them.",
                                    env=("TEXT_CACHE_ONDEMAND",), unsupported=_ALWAYS_CACHED)
    text_cache_disable: bool = opt(False, "Do not cache text embeddings.", env=("TEXT_CACHE_DISABLE",),
                                   unsupported=_ALWAYS_CACHED)
    cache_dir: str | None = opt(None, "Root of the shared cache store for datasets that name no cache dirs "
                                      "(unset: $XDG_CACHE_HOME/expertune or ~/.cache/expertune).",
                                      on_resume="may_change")
    # -- issue 23 (knobs): horizontal flip augmentation ------------------------------------------------------
    flip_images: bool = opt(False, "Horizontal flip augmentation: every image is also cached mirrored (its own "
                                   "latent, with SDXL's crop_left mirrored) and each sample trains as one or the "
                                   "other, a fair coin per epoch. Not for images whose left and right matter "
                                   "(text, asymmetric subjects).")
    # The SDXL refiner layout (docs/refiner.md); SimpleTuner's name and default.
    data_aesthetic_score: float = opt(7.0, "Aesthetic score every training image is conditioned on when the model "
                                           "has the SDXL refiner layout (its fifth time id; ignored otherwise).",
                                      ge=0)


@dataclass(frozen=True)
class BandConfig:
    """Which timestep band of the schedule this expert is trained on."""

    refiner_training: bool = opt(False, "Train one expert of a timestep split (default band: the refiner's "
                                        "low-noise end).")
    refiner_training_strength: float = opt(0.2, "Fraction of the schedule, from the low-noise end, that the "
                                                "refiner expert owns.", gt=0, lt=1)
    refiner_training_invert_schedule: bool = opt(False, "Train the base expert: the complementary high-noise "
                                                        "band (needs refiner_training).")
    timestep_range: str | None = opt(None, "Explicit inclusive band 'LO,HI' of training timesteps (instead "
                                           "of refiner_training).", check=parse_timestep_range)
    timestep_sampling: str = opt("uniform", "How training timesteps are drawn inside the band.",
                                 choices=("uniform", "stratified"))
    # -- issue 23 (knobs): the timestep distribution inside the band (timestep_dist.py) ------------------------
    timestep_distribution: str = opt("uniform", "Distribution of training timesteps over the whole schedule, cut "
                                     "to the expert's band by conditioning (its shape kept): uniform, or "
                                     "logit_normal (t/N = sigmoid(u), u ~ N(logit_mean, logit_std^2)).",
                                     choices=("uniform", "logit_normal"))
    logit_mean: float = opt(0.0, "Mean of timestep_distribution=logit_normal's normal (< 0: more low-noise "
                                 "timesteps, > 0: more high-noise).")
    logit_std: float = opt(1.0, "Standard deviation of timestep_distribution=logit_normal's normal.", gt=0)
    timestep_bias_strategy: str = opt("none", "SimpleTuner's timestep bias: multiply the probability of the "
                                      "earlier (low-noise), later (high-noise) or a range of timesteps by "
                                      "timestep_bias_multiplier, then cut to the band.",
                                      choices=("none", "earlier", "later", "range"))
    timestep_bias_multiplier: float = opt(1.0, "Factor on the probability of the biased timesteps (< 1 avoids "
                                               "them).", gt=0)
    timestep_bias_begin: int = opt(0, "First timestep of timestep_bias_strategy=range.", ge=0)
    timestep_bias_end: int = opt(1000, "End (excluded) of timestep_bias_strategy=range.", ge=1)
    timestep_bias_portion: float = opt(0.25, "Fraction of the schedule biased by timestep_bias_strategy=earlier "
                                             "or later.", ge=0, le=1)


def _check_export_format(text: str) -> None:
    from expertune.expert_format import parse_formats  # issue 19 (export)

    parse_formats(text)


def _check_mixture_boundaries(text: str) -> None:
    """The syntax of `mixture_boundaries` (where they fall is checked against the schedule at setup)."""
    from expertune.mixture import parse_boundaries

    try:
        parse_boundaries(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class MixtureConfig:
    """Several experts trained in one job (docs/mixtures.md): the plan, who trains when, per-expert settings."""

    mixture_boundaries: str | None = opt(
        None, "Train every expert of a mixture in one job: boundaries highest first, each a timestep (350), "
        "snr:X or logsnr:X on the run's schedule; N boundaries make N + 1 experts.",
        check=_check_mixture_boundaries)
    mixture_schedule: str = opt("alternate", "Which expert trains each step of a joint job: take turns "
                                "(alternate), by band size (proportional), or by a drawn timestep (timestep).",
                                choices=("alternate", "proportional", "timestep"))
    mixture_switch_every: int = opt(1, "Steps each expert trains before the next one's turn "
                                       "(mixture_schedule=alternate).", ge=1)
    mixture_offload_inactive: bool = opt(False, "Keep the experts that are not training in CPU memory (weights "
                                                "and optimizer state) and move each onto the accelerator for "
                                                "its turn.", on_resume="may_change")
    expert_models: str | None = opt(None, "Model each expert starts from, comma-separated in chain order (unset: "
                                          "all start from pretrained_model_name_or_path).")
    expert_learning_rates: str | None = opt(None, "Peak learning rate per expert, comma-separated in chain order, "
                                                  "or one for all (unset: learning_rate).")
    expert_loss_weightings: str | None = opt(None, "loss_weighting per expert, comma-separated in chain order, or "
                                                   "one for all (unset: loss_weighting).")
    expert_ema_decays: str | None = opt(None, "EMA decay per expert with --use_ema, comma-separated in chain "
                                              "order, or one for all (unset: ema_decay).")
    # ---- issue 22 (plan helper): a shared start before the split ------------------------------------------------
    mixture_shared_steps: str | None = opt(
        None, "Train one model on the union of the bands for this many job steps (400) or this fraction of the run "
        "(0.25), then branch it into the experts (weights, optimizer state and EMA copied) for the rest.")
    mixture_overlap: str | None = opt(
        None, "Train each expert on its band widened across each boundary by this many timesteps (50), or by this "
        "margin in natural log-SNR (snr:0.5); sampled uniformly over the widened band, weighted as any timestep.")
    mixture_handoff_blend: int = opt(
        0, "Blend the chain's hand-offs over a window of this many timesteps in validation, recorded in mixture.json "
        "as the default of `expertune generate --mixture` (0: hard switches).", ge=0, on_resume="may_change")


@dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule and parameterisation."""

    prediction_type: str | None = opt(None, "What the UNet predicts (unset: keep the model's own).",
                                      choices=PREDICTION_TYPES)
    rescale_betas_zero_snr: bool = opt(False, "Rescale the betas to zero terminal SNR.")
    training_scheduler_timestep_spacing: str = opt(
        "trailing", "Recorded in expert.json only: training draws every integer timestep of the band "
        "whatever the spacing (the inference spacing shapes the sampler).", choices=SPACINGS,
        env=("TRAINING_SCHEDULER_TIMESTEP_SPACING",))
    inference_scheduler_timestep_spacing: str = opt(
        "trailing", "Timestep spacing of the scheduler used for validation images.", choices=SPACINGS,
        env=("INFERENCE_SCHEDULER_TIMESTEP_SPACING",))


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and where its results go."""

    output_dir: str | None = opt(None, "Directory the run writes its model, logs and run.json to.",
                                 env=("OUTPUT_DIR",), required_for_training=True)
    overwrite_output_dir: bool = opt(False, "Replace an earlier run found in output_dir (otherwise the run is "
                                            "refused, so nothing is overwritten by accident).",
                                            on_resume="not_compared")
    seed: int = opt(42, "Random seed of the run; -1 (SimpleTuner's \"random\"): one drawn at the start and "
                        "recorded in run.json (a resume keeps its checkpoint's).", ge=-1, env=("TRAINING_SEED",))
    learning_rate: float = opt(1e-6, "Peak learning rate.", gt=0, env=("LEARNING_RATE",))
    lr_scheduler: str = opt("constant", "Learning-rate schedule (see docs/usage.md, Learning-rate schedules): "
                                        "diffusers' schedules, and SimpleTuner's cyclic sine.", env=("LR_SCHEDULE",),
                            choices=("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                                     "polynomial", "sine"))
    lr_warmup_steps: int = opt(0, "Linear warm-up steps at the start of the schedule; for sine, the period of "
                                  "its wave.", ge=0, env=("LR_WARMUP_STEPS",))
    lr_end: float = opt(4e-7, "Final learning rate of the polynomial schedule; the lower bound of the sine "
                              "wave.", ge=0, env=("LR_END",))
    lr_num_cycles: int = opt(1, "Hard restarts of the cosine_with_restarts schedule.", ge=1)
    lr_power: float = opt(1.0, "Power of the polynomial schedule (SimpleTuner's default was 0.8).", gt=0)
    train_batch_size: int = opt(1, "Samples per optimiser micro-batch.", ge=1, env=("TRAIN_BATCH_SIZE",))
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimiser step.", ge=1,
                                           env=("GRADIENT_ACCUMULATION_STEPS",))
    gradient_checkpointing: bool = opt(False, "Recompute UNet activations in the backward pass to save memory.",
                                       env=("USE_GRADIENT_CHECKPOINTING",))
    max_train_steps: int | None = opt(None, "Optimiser steps to train (wins over num_train_epochs; both unset: "
                                            "1 epoch).", ge=1, zero_is_none=True, env=("MAX_NUM_STEPS",),
                                            on_resume="may_change")
    num_train_epochs: int | None = opt(None, "Epochs to train when max_train_steps is unset (both unset: "
                                             "1 epoch).", ge=1, zero_is_none=True, env=("NUM_EPOCHS",),
                                             on_resume="may_change")
    max_grad_norm: float = opt(1.0, "Gradient-norm clipping threshold (0 disables clipping).", ge=0)
    snr_gamma: float | None = opt(None, "Min-SNR-gamma loss weighting with this gamma (5 is usual); sets "
                                        "loss_weighting=min_snr (unset: no weighting).", gt=0, env=("MIN_SNR_GAMMA",))
    loss_weighting: str | None = opt(None, "Per-sample loss weight over the expert's band (docs/usage.md, Loss "
                                           "weighting): none, min_snr (needs snr_gamma), debiased (1/sqrt(SNR), "
                                           "capped), or unset: min_snr when snr_gamma is set, else none.",
                                     choices=("none", "min_snr", "debiased"))
    # -- issue 23 (knobs): loss types (losses.py); the per-band evaluation always scores MSE ----------------------
    loss_type: str = opt("l2", "Training loss: l2 (mean squared error), huber (pseudo-Huber 2c(sqrt(r^2+c^2)-c): "
                               "MSE-like for small residuals, linear for large ones, robust to outliers) or "
                               "smooth_l1 (the same / c).", choices=("l2", "huber", "smooth_l1"),
                         aliases={"mse": "l2", "pseudo_huber": "huber"})
    huber_schedule: str = opt("snr", "How the huber / smooth_l1 threshold c changes with the timestep: snr "
                                     "((1-huber_c)/(1+sigma)^2+huber_c), exponential (huber_c^(t/N)) or constant "
                                     "(huber_c).", choices=("snr", "exponential", "constant"))
    huber_c: float = opt(0.1, "Threshold c of the huber / smooth_l1 loss (its value at high noise for the snr and "
                              "exponential schedules).", gt=0, le=1)
    optimizer: str = opt("adamw", "Optimiser: adamw (torch), adamw_bf16 (SimpleTuner's: bfloat16 weights, "
                                  "stochastic rounding and a compensation buffer; needs mixed_precision=bf16), "
                                  "adamw8bit (bitsandbytes, CUDA), adafactor (memory-lean, factored second "
                                  "moments), prodigy (learning-rate free: use learning_rate=1.0).",
                         aliases={"adamw_torch": "adamw", "adamw_8bit": "adamw8bit", "bnb-adamw8bit": "adamw8bit"},
                         env=("OPTIMIZER",), unsupported=Unsupported(
        f"not one of {', '.join(OPTIMIZERS)}", lambda v: v not in OPTIMIZERS, f"supported optimizers are "
        f"{', '.join(OPTIMIZERS)} (adamw_bf16: SimpleTuner's bfloat16 AdamW; adamw8bit: bitsandbytes)"))
    # -- issue 23 (knobs): the optimizer step in the backward pass (train/fused.py) -----------------------------
    optimizer_release_gradients: bool = opt(False, "Step each parameter as soon as its gradient is complete, in "
                                            "the backward pass, and free the gradient at once (kohya's fused "
                                            "backward pass): saves up to one copy of the trained weights of memory "
                                            "in a full fine-tune. Needs optimizer adamw, adamw_bf16 or adafactor, "
                                            "gradient_accumulation_steps=1, max_grad_norm=0 and one process.")
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_weight_decay: float = opt(1e-2, "AdamW decoupled weight decay.", ge=0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", gt=0)
    use_ema: bool = opt(False, "Keep an exponential moving average (EMA) of the UNet weights.", env=("USE_EMA",))
    ema_decay: float = opt(0.9999, "Upper bound of the EMA decay (diffusers EMAModel warms it up as "
                                   "(1 + n) / (10 + n)).", gt=0, lt=1, env=("EMA_DECAY",))
    ema_update_interval: int = opt(1, "Update the EMA every this many optimizer steps.", ge=1)
    ema_device: str = opt("accelerator", "Where the EMA weights live: with the model, or in CPU memory.",
                          choices=("accelerator", "cpu"))
    export_ema: bool = opt(False, "Save the EMA weights, not the trained weights, as the pipeline's UNet "
                                  "(needs --use_ema).", on_resume="may_change")
    resume_from_checkpoint: str | None = opt(None, "Resume from a checkpoint: 'latest' (the newest complete one) "
                                                   "or a checkpoint name/path.", env=("RESUME_CHECKPOINT",),
                                                   on_resume="not_compared")
    allow_config_change: bool = opt(False, "On resume, accept changed validation, logging, checkpoint and "
                                           "length settings (other changes are always refused).",
                                           on_resume="not_compared")
    checkpoint_step_interval: int | None = opt(None, "Save a checkpoint every this many steps.", ge=1,
                                               env=("CHECKPOINTING_STEPS", "CHECKPOINT_STEP_INTERVAL",
                                                    "CHECKPOINT_STEPS"),
                                               on_resume="may_change")
    checkpoint_epoch_interval: int | None = opt(None, "Save a checkpoint every this many epochs.", ge=1,
                                                env=("CHECKPOINT_EPOCH_INTERVAL",), on_resume="may_change")
    checkpoints_total_limit: int | None = opt(None, "Keep at most this many checkpoints.", ge=1,
                                              env=("CHECKPOINTING_LIMIT",), on_resume="may_change")
    num_processes: int = opt(1, "Training processes (GPUs) per machine.", ge=1, env=("TRAINING_NUM_PROCESSES",))
    num_machines: int = opt(1, "Machines taking part in training.", ge=1, env=("TRAINING_NUM_MACHINES",))
    accelerate_config: str | None = opt(None, "accelerate launch config file: DDP, FSDP or DeepSpeed ZeRO (see "
                                        "examples/accelerate/ and docs/distributed.md).",
                                        env=("ACCELERATE_CONFIG_PATH",))
    accelerate_extra_args: str | None = opt(None, "Extra arguments for accelerate launch.",
                                            env=("ACCELERATE_EXTRA_ARGS",))
    # issue 25 (speed): honest step timing, throughput and MFU; the host out of the accelerator's way.
    timing_breakdown_interval: int | None = opt(None, "Every this many steps also log the step's data, compute and "
                                                      "optimizer seconds (seconds_data, seconds_compute, "
                                                      "seconds_optimizer) in metrics.jsonl; each such step waits for "
                                                      "the accelerator between its parts (unset: never).", ge=1,
                                                on_resume="not_compared")
    peak_tflops: float | None = opt(None, "The accelerator's dense peak TFLOP/s in the run's precision, for the model "
                                          "FLOP utilisation (mfu) in metrics.jsonl (unset: the datasheet figure of "
                                          "a recognised NVIDIA GPU, else no mfu).", gt=0, on_resume="not_compared")
    prefetch_batches: bool = opt(True, "Read, collate (and on CUDA pin) the next step's batches on a background "
                                       "thread while the step runs; the batches and their order are the same either "
                                       "way.", on_resume="not_compared")
    # issue 19 (config): SimpleTuner's offset noise (its names, defaults and switch).
    offset_noise: bool = opt(False, "Offset noise: add noise_offset * N(0, 1) of shape (C, 1, 1) to a sample's "
                                    "noise, with probability noise_offset_probability per sample.")
    noise_offset: float = opt(0.1, "Strength of the offset noise (used with offset_noise).", ge=0)
    noise_offset_probability: float = opt(0.25, "Probability that a sample gets the offset noise (with "
                                                "offset_noise).", ge=0, le=1)
    # -- issue 23 (knobs): input perturbation (SimpleTuner's names) -------------------------------------------
    input_perturbation: float = opt(0.0, "Input perturbation (Ning et al. 2023): make the noisy input with noise "
                                         "+ input_perturbation * N(0, 1) while the target keeps the noise; 0.1 is "
                                         "usual; 0: off.", ge=0)
    input_perturbation_steps: int = opt(0, "Decay input_perturbation linearly to 0 over this many optimizer steps "
                                           "of each expert (0: constant).", ge=0)
    masked_loss_probability: float = opt(1.0, "With loss masks (a dataset's conditioning_data mask dataset or "
                                              "alpha_mask), the probability that a micro-batch's loss is masked "
                                              "(otherwise the whole image counts).", ge=0, le=1)
    # -- issue 19 (export): the formats a run exports in, and the export after a Ctrl-C / SIGTERM --------------
    export_format: str = opt("diffusers", "Formats of the exported experts, comma-separated: diffusers (pipeline "
                             "folders with expert.json) and single_file (one original-layout .safetensors per expert "
                             "for ComfyUI / A1111, kohya-layout LoRAs, and a ComfyUI workflow of the chain).",
                             check=lambda text: _check_export_format(text),
                             on_resume="may_change")
    export_precision: str = opt("fp32", "Weights of the single_file export.", choices=("fp32", "fp16", "bf16"),
                                on_resume="may_change")
    export_on_interrupt: bool = opt(True, "When Ctrl-C or SIGTERM stops training, export the experts after the "
                                          "checkpoint (in --export_format).", on_resume="may_change")
    # --- issue 20 (helper ckpt): non-finite updates are skipped; this many in a row stop the run ---
    max_nonfinite_steps: int = opt(5, "Stop the run when this many updates in a row had a non-finite loss or "
                                      "gradient norm (each is skipped and logged, naming its batch's images).", ge=1,
                                   on_resume="may_change")


@dataclass(frozen=True)
class ValidationConfig:
    """Sample images made during training."""

    validation_disable: bool = opt(False, "Make no validation images and no evaluation metrics at all (e.g. for "
                                          "benchmarks).")
    validation_prompt: str | None = opt(None, "Prompt of the validation images (unset, with no prompt library: the "
                                              "captions of a seeded choice of dataset images).",
                                        env=("VALIDATION_PROMPT",))
    validation_prompt_library: str | None = opt(
        None, "File of more validation prompts: a .json object {name: prompt}, or any other file with one prompt "
              "per line (named line_NN after its line number; blank and # lines skipped).")
    validation_negative_prompt: str = opt("", "Negative prompt of the validation images.",
                                          env=("VALIDATION_NEGATIVE_PROMPT",))
    validation_step_interval: int | None = opt(None, "Validate every this many steps (unset: only at the end).",
                                               ge=1, env=("VALIDATION_STEPS", "VALIDATION_STEP_INTERVAL"))
    validation_on_startup: bool = opt(False, "Also validate before the first training step (step 0).")
    validation_num_inference_steps: int = opt(20, "Denoising steps of the whole schedule per validation image (the "
                                                  "expert runs the ones inside its band).", ge=1,
                                              env=("VALIDATION_NUM_INFERENCE_STEPS",))
    validation_guidance: float = opt(7.5, "Classifier-free guidance scale of the validation images.", ge=0,
                                     env=("VALIDATION_GUIDANCE",))
    validation_guidance_rescale: float = opt(0.0, "Guidance rescale (Lin et al.) of the validation images; 0.7 is "
                                                  "recommended with zero-terminal SNR.", ge=0, le=1,
                                             env=("VALIDATION_GUIDANCE_RESCALE",))
    # issue 19 (config): SimpleTuner's WxH and comma-separated sizes.
    validation_resolution: str | None = opt(None, "Size of text-to-image validation images and of encoded "
                                                  "validation_input images: 1024 (a square), 1024x1024 (WxH), or "
                                                  "several comma-separated (1024x1024,1152x896: validate at each); "
                                                  "unset: the square bucket of resolution.",
                                            check=parse_validation_resolutions, env=("VALIDATION_RESOLUTION",))
    validation_seed: int | None = opt(None, "Seed of the validation images (unset: seed).", ge=0,
                                      env=("VALIDATION_SEED",))
    validation_using_datasets: bool = opt(False, "Validate a low-noise expert by partially denoising a seeded "
                                                 "choice of dataset images (datasets with disable_validation "
                                                 "excluded).")
    validation_input: str | None = opt(None, "Image or directory of images a low-noise expert partially denoises "
                                             "at each validation (a caption in a same-named .txt file is used as "
                                             "its prompt).", env=("VALIDATION_INPUT",))
    validation_peer_expert: str | None = opt(
        None, "The other expert of the chain (a saved expert pipeline, or a training output_dir holding "
              "pipeline/): validation also runs the full chain through it.")
    evaluation_type: str = opt("none", "Score validation images against their prompts: clip = CLIP score "
                                       "(torchmetrics, 0-100).", choices=("none", "clip"))
    pretrained_evaluation_model_name_or_path: str = opt(
        DEFAULT_EVALUATION_MODEL, "CLIP model of the CLIP score: a local directory (CLIPModel + "
                                          "CLIPProcessor) or a Hugging Face hub id.")
    eval_dataset_id: str | None = opt(None, "Id of a dataset of the dataloader JSON held out from training for "
                                            "the per-band validation loss.")
    eval_holdout_fraction: float | None = opt(None, "Fraction of the images (a seeded choice) held out from "
                                                    "training for the per-band validation loss.", gt=0, lt=1)
    # issue 25 (speed): a cap on the held-out images scored at each validation.
    eval_holdout_max_images: int = opt(256, "Score at most this many held-out images (the first, in a fixed order) "
                                            "for the per-band validation loss; each costs eval_subbands x "
                                            "eval_timesteps_per_subband UNet forward passes.", ge=1)
    eval_subbands: int = opt(4, "Equal sub-bands of the expert's band the held-out loss is reported for.", ge=1)
    eval_timesteps_per_subband: int = opt(4, "Fixed timesteps per sub-band at which each held-out image is "
                                             "scored.", ge=1)
    # The SDXL refiner layout (docs/refiner.md): diffusers' pipeline defaults.
    validation_aesthetic_score: float = opt(6.0, "Aesthetic score of the validation images of a refiner-layout "
                                                 "expert (diffusers' aesthetic_score).", ge=0)
    validation_negative_aesthetic_score: float = opt(2.5, "Aesthetic score of the negative branch of a "
                                                          "refiner-layout expert's validation images (diffusers' "
                                                          "negative_aesthetic_score).", ge=0)


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics tracking."""

    report_to: str = opt("tensorboard", "Where metrics go: tensorboard, wandb (Weights & Biases; offline when "
                                        "it has no credentials or network), all (both), none.",
                         choices=("tensorboard", "wandb", "all", "none"))
    tracker_project_name: str = opt("expertune", "Project name given to the tracker.",
                                    env=("TRACKER_PROJECT_NAME",))
    tracker_run_name: str | None = opt(None, "Name of the run in the tracker (TensorBoard: its folder under "
                                       "logging_dir); unset: tracker_project_name.", env=("TRACKER_RUN_NAME",))
    logging_dir: str | None = opt(None, "Directory of the tracker logs (unset: the logs folder inside output_dir).")


# ---- issue 19, hub helper: publishing to the Hugging Face hub (SimpleTuner's names) --------------------------
@dataclass(frozen=True)
class HubConfig:
    """Publishing to the Hugging Face hub (after the local export: a failed upload loses nothing)."""

    push_to_hub: bool = opt(False, "After training, upload the exported expert(s) with a model card to the hub "
                                   "repository hub_model_id (created private if missing; needs a token: "
                                   "`hf auth login` or HF_TOKEN).", env=("PUSH_TO_HUB",), on_resume="not_compared")
    hub_model_id: str | None = opt(None, "Hub repository of push_to_hub: `owner/name`, or `name` under the "
                                         "token's account.", env=("HUB_MODEL_NAME",), on_resume="not_compared")
    push_checkpoints_to_hub: bool = opt(False, "With push_to_hub, also upload each checkpoint as it is saved, to "
                                               "checkpoints/checkpoint-<step>/ of the repository (training waits "
                                               "for the upload; a failed one is logged and training goes on).",
                                        env=("PUSH_CHECKPOINTS",), on_resume="not_compared")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "band": BandConfig, "mixture": MixtureConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig, "validation": ValidationConfig, "logging": LoggingConfig,
    "hub": HubConfig,  # issue 19, hub helper
}

# SimpleTuner options from the config.env table that expertune has no field for: rows of the flag table
# (config/simpletuner_flags.py, with their reasons), ignored whether they come as an env variable, a flag or a
# TOML key. Flag name -> config.env variable.
IGNORED_OPTIONS: dict[str, str] = ENV_NAMES


def _build_fields() -> dict[str, FieldSpec]:
    registry: dict[str, FieldSpec] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            hint = hints[f.name]
            args = typing.get_args(hint)
            optional = isinstance(hint, types.UnionType) and type(None) in args
            base = next(a for a in args if a is not type(None)) if optional else hint
            if f.name in registry:
                raise AssertionError(f"duplicate config field {f.name}")
            meta = dict(f.metadata[_META_KEY])
            if meta["unsupported"] is not None:
                meta["unsupported"] = replace(meta["unsupported"], name=f.name)
            registry[f.name] = FieldSpec(name=f.name, section=section, type=base, optional=optional,
                                         default=f.default, **meta)
    return registry


FIELDS: dict[str, FieldSpec] = _build_fields()

# Settings `expertune train` cannot run without (load_config does not require them), in field order.
REQUIRED_FOR_TRAINING: tuple[str, ...] = tuple(n for n, spec in FIELDS.items() if spec.required_for_training)
# The values expertune refuses for lack of the feature, one row per option that has some.
UNSUPPORTED: tuple[Unsupported, ...] = tuple(spec.unsupported for spec in FIELDS.values() if spec.unsupported)


@dataclass(frozen=True)
class Config:
    """The whole configuration, one section per concern. Build it with ``load_config``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    band: BandConfig = field(default_factory=BandConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # issue 19, hub helper

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> Config:
        """Build from already-typed flat values (missing names keep their defaults; no validation)."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in values.items():
            per_section[FIELDS[name].section][name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})

    def flat(self) -> dict[str, Any]:
        """All fields by name, in section order."""
        return {name: getattr(getattr(self, spec.section), name) for name, spec in FIELDS.items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-safe nested dict ``{section: {field: value}}`` (for run.json)."""
        out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in self.flat().items():
            out[FIELDS[name].section][name] = value
        return out

    @property
    def mixture_plan(self) -> MixturePlan | None:
        """The mixture plan (config/plan.py), parsed from the mixture options; None for a single expert."""
        from expertune.config.plan import MixturePlan  # issue 22 (plan helper)

        return MixturePlan.from_values(self.flat())

    @property
    def timestep_bounds(self) -> tuple[int, int] | None:
        """``timestep_range`` parsed to ``(LO, HI)``, or None when unset."""
        text = self.band.timestep_range
        return None if text is None else parse_timestep_range(text)

    def resolved_cache_dir(self) -> Path:
        return Path(self.data.cache_dir).expanduser() if self.data.cache_dir else default_cache_dir()

    def resolved_logging_dir(self) -> Path | None:
        if self.logging.logging_dir:
            return Path(self.logging.logging_dir).expanduser()
        return Path(self.train.output_dir).expanduser() / "logs" if self.train.output_dir else None

    def require_for_training(self) -> None:
        """Raise ConfigError naming every unset setting that training needs and how to set it."""
        self.require("training", REQUIRED_FOR_TRAINING)

    def require(self, purpose: str, names: tuple[str, ...]) -> None:
        """Raise ConfigError naming every unset setting of `names` that `purpose` needs, and how to set it."""
        flat = self.flat()
        missing = [n for n in names if flat[n] is None]
        if not missing:
            return
        lines = []
        for name in missing:
            env = " or ".join(FIELDS[name].env)
            how = f"--{name}, `{name} = ...` in the --config TOML" + (f", or {env} in the --env file" if env else "")
            lines.append(f"  {name}: set {how}")
        raise ConfigError(f"{purpose} needs settings that are unset:\n" + "\n".join(lines))
