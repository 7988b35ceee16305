"""Load, check and save SDXL-family models (SDXL base, SSD-1B, the SDXL refiner, any UNet of those layouts).

The one loading path is diffusers/transformers `from_pretrained(name_or_path)`, safetensors only; a single-file
`.safetensors` checkpoint is first converted to a diffusers folder (`model_folder`, models/single_file_in.py).

Two layouts (`layout_kind`), told apart by the pipeline's `model_index.json`:

- "base" (SDXL base, SSD-1B): two text encoders whose penultimate hidden states are concatenated, six time
  ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w); a `StableDiffusionXLPipeline`;
- "refiner" (the SDXL refiner): `text_encoder` and `tokenizer` null, text encoder 2 (bigG) only, five time
  ids (orig_h, orig_w, crop_top, crop_left, aesthetic_score) and `requires_aesthetics_score: true`; a
  `StableDiffusionXLImg2ImgPipeline`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from expertune.errors import ModelError
from expertune.io_utils import staged_directory
from expertune.models.source import check_model_source, describe_source, hub_failure, log_loaded, looks_like_path

if TYPE_CHECKING:
    from expertune.expert_format import ExpertDescription

log = logging.getLogger(__name__)


BASE_LAYOUT = "base"
REFINER_LAYOUT = "refiner"
TIME_IDS = {BASE_LAYOUT: 6, REFINER_LAYOUT: 5}  # added time ids the UNet of each layout is conditioned on


@dataclass
class SDXLComponents:
    """The parts of an SDXL-layout pipeline that training needs. Text encoders may be released.

    A refiner-layout model (`layout_kind` "refiner") has no text encoder 1 nor tokenizer 1 (both None).
    """

    source: str
    unet: Any
    vae: Any
    tokenizer_1: Any | None
    tokenizer_2: Any
    text_encoder_1: Any | None
    text_encoder_2: Any | None
    scheduler_config: dict[str, Any]
    scheduler_class: str
    layout_kind: str = BASE_LAYOUT
    requires_aesthetics_score: bool = False
    revision: str | None = None  # what the source was read at: a reload (text encoders for export) reads the same
    variant: str | None = None

    @property
    def is_refiner(self) -> bool:
        return self.layout_kind == REFINER_LAYOUT

    @property
    def time_id_count(self) -> int:
        return TIME_IDS[self.layout_kind]

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """The tokenizers whose encoders make the prompt embeddings, in concatenation order."""
        return (self.tokenizer_2,) if self.is_refiner else (self.tokenizer_1, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """The text encoders of the layout, in concatenation order (None entries once released)."""
        return (self.text_encoder_2,) if self.is_refiner else (self.text_encoder_1, self.text_encoder_2)

    def frozen_modules(self) -> list[Any]:
        """The VAE and the text encoders still held: what is moved to the device and never trained."""
        return [m for m in (self.vae, self.text_encoder_1, self.text_encoder_2) if m is not None]

    def release_text_encoders(self) -> None:
        """Free the text encoders once every embedding is cached (they are GBs on real models)."""
        self.text_encoder_1 = None
        self.text_encoder_2 = None


def _load(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    started = time.monotonic()
    try:
        loaded = cls.from_pretrained(source, subfolder=subfolder, **kwargs)
        log_loaded(source, subfolder, loaded, time.monotonic() - started)
        return loaded
    except (OSError, ValueError, EnvironmentError) as error:
        local = Path(source).expanduser()
        if not local.exists() and not looks_like_path(source):  # a hub id: say why the hub could not give it
            raise hub_failure(source, kwargs.get("revision"), error, subfolder) from None
        if not local.exists():
            raise ModelError(
                f"model path {source!r} does not exist; pass a local diffusers SDXL directory "
                "(with model_index.json) or a Hugging Face hub id"
            ) from None
        if local.is_dir() and not (local / subfolder).is_dir():
            raise ModelError(
                f"model {source!r} has no '{subfolder}/' folder: expected a diffusers SDXL pipeline directory "
                "(unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)"
            ) from None
        raise ModelError(f"could not load '{subfolder}' of model {source!r}: {error}") from None


def check_sdxl_layout(unet_layout: Any, text_width_1: int | None, text_width_2: int, pooled_width: int,
                      source: str, *, requires_aesthetics_score: bool = False) -> None:
    """Refuse a model whose UNet does not fit its text encoders: text_time conditioning, cross-attention over
    both encoders' widths (text encoder 2's alone when `text_width_1` is None: the refiner layout), and an added
    embedding of the pooled width plus 6 time ids (5 for the refiner: aesthetic score instead of target size)."""
    refiner = text_width_1 is None
    kind = "SDXL-refiner-layout" if refiner else "SDXL-layout"
    problems = []
    if getattr(unet_layout, "addition_embed_type", None) != "text_time":
        problems.append(
            f"unet addition_embed_type is {getattr(unet_layout, 'addition_embed_type', None)!r}, "
            "SDXL-layout models use 'text_time' (an SD 1.x/2.x UNet cannot be trained as an SDXL expert)"
        )
    if text_width_1 is None:
        widths, described = text_width_2, f"text encoder 2 width {text_width_2} (the refiner layout has no text encoder 1)"
    else:
        widths, described = text_width_1 + text_width_2, f"text encoder widths {text_width_1} + {text_width_2}"
    if unet_layout.cross_attention_dim != widths:
        problems.append(f"unet cross_attention_dim {unet_layout.cross_attention_dim} != {described}")
    time_ids = TIME_IDS[REFINER_LAYOUT if refiner else BASE_LAYOUT]
    time_dim = unet_layout.addition_time_embed_dim or 0
    projection = unet_layout.projection_class_embeddings_input_dim
    if projection != pooled_width + time_ids * time_dim:
        fits = f"; it fits {(projection - pooled_width) / time_dim:g} time ids" if time_dim and projection else ""
        problems.append(
            f"unet projection_class_embeddings_input_dim {projection} != pooled width {pooled_width} + "
            f"{time_ids} x addition_time_embed_dim {time_dim}{fits}"
        )
    if refiner and not requires_aesthetics_score:
        problems.append("model_index.json has no text_encoder but requires_aesthetics_score is not true "
                        "(the refiner layout conditions on the aesthetic score; set it to true)")
    if not refiner and requires_aesthetics_score:
        problems.append("model_index.json sets requires_aesthetics_score but the model has text_encoder: "
                        "a two-encoder model with aesthetic-score time ids is not a layout expertune trains")
    if problems:
        raise ModelError(f"model {source!r} is not an {kind} model: " + "; ".join(problems))


def read_pipeline_index(source: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's `model_index.json` (a local directory or hub id); {} when it has none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except (OSError, ValueError, EnvironmentError):
        return {}


def layout_kind_of(index: dict[str, Any]) -> str:
    """"refiner" when `model_index.json` names no text encoder 1 (the SDXL refiner's `[null, null]`), else "base"."""
    entry = index.get("text_encoder", ["transformers", "CLIPTextModel"]) if index else ["", ""]
    missing = entry is None or (isinstance(entry, (list, tuple)) and all(part is None for part in entry))
    return REFINER_LAYOUT if missing else BASE_LAYOUT


class _ConfigOnly:
    """`from_pretrained` stand-in that reads only a component's config (for `with_unet=False`)."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def from_pretrained(self, source: str, subfolder: str, **kwargs: Any) -> Any:
        import types

        config = self.cls.load_config(source, subfolder=subfolder, revision=kwargs.get("revision"))
        return types.SimpleNamespace(config=types.SimpleNamespace(**dict(config)))


def load_components(
    source: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    with_unet: bool = True,
    single_file_config: str | None = None,
    cache_dir: Path | None = None,
) -> SDXLComponents:
    """Load an SDXL-layout model's components from a local directory or hub id (safetensors only).

    The layout (base or refiner, see the module doc) is read from `model_index.json`; a refiner-layout model
    loads without text encoder 1 and tokenizer 1. `with_unet=False` reads only the UNet's config (to check the
    layout) and leaves `unet` None: what building the caches needs (`expertune cache`), without the UNet's
    gigabytes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = model_folder(source, single_file_config=single_file_config, cache_dir=cache_dir)
    if folder != source:  # a converted single file: one folder, no revisions nor variants
        source, revision, variant = folder, None, None
    check_model_source(source, revision)
    log.info("loading model %s", describe_source(source, revision))
    index = read_pipeline_index(source, revision=revision)
    layout_kind = layout_kind_of(index)
    refiner = layout_kind == REFINER_LAYOUT
    requires_aesthetics_score = bool(index.get("requires_aesthetics_score", False))
    common: dict[str, Any] = {"revision": revision}
    weights: dict[str, Any] = {**common, "variant": variant, "use_safetensors": True}
    text_1 = None if refiner else _load(CLIPTextModel, source, "text_encoder", **weights, dtype=dtype)
    text_2 = _load(CLIPTextModelWithProjection, source, "text_encoder_2", **weights, dtype=dtype)
    unet_loader = UNet2DConditionModel if with_unet else _ConfigOnly(UNet2DConditionModel)
    unet = _load(unet_loader, source, "unet", **weights, torch_dtype=dtype)
    check_sdxl_layout(unet.config, None if text_1 is None else text_1.config.hidden_size,
                      text_2.config.hidden_size, text_2.config.projection_dim, source,
                      requires_aesthetics_score=requires_aesthetics_score)
    vae = _load(AutoencoderKL, source, "vae", **weights, torch_dtype=dtype)
    tokenizer_1 = None if refiner else _load(CLIPTokenizer, source, "tokenizer", **common)
    tokenizer_2 = _load(CLIPTokenizer, source, "tokenizer_2", **common)
    scheduler_config = read_scheduler_config(source, revision=revision)
    for module in (text_1, text_2, vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    if refiner:
        log.info("model %s has the SDXL refiner layout: text encoder 2 only, aesthetic-score time ids", source)
    return SDXLComponents(
        source=source,
        unet=unet if with_unet else None,
        vae=vae,
        tokenizer_1=tokenizer_1,
        tokenizer_2=tokenizer_2,
        text_encoder_1=text_1,
        text_encoder_2=text_2,
        scheduler_config=scheduler_config,
        scheduler_class=str(scheduler_config.get("_class_name", "EulerDiscreteScheduler")),
        layout_kind=layout_kind,
        requires_aesthetics_score=requires_aesthetics_score,
        revision=revision,
        variant=variant,
    )


def model_folder(source: str, *, single_file_config: str | None = None, cache_dir: Path | None = None) -> str:
    """`source` itself, or for a single-file `.safetensors` checkpoint the diffusers folder it is converted to once
    (models.single_file_in: under `cache_dir`, default the per-user cache)."""
    from expertune.models.single_file_in import is_single_file, materialise

    if not is_single_file(source):
        return source
    if cache_dir is None:
        from expertune.io_utils import default_cache_dir

        cache_dir = default_cache_dir()
    return str(materialise(source, cache_dir=cache_dir, single_file_config=single_file_config))


def read_scheduler_config(source: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """The `scheduler/scheduler_config.json` of a model or saved expert (a directory or hub id)."""
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(str(source), subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as error:
        raise ModelError(f"could not read scheduler config of model {str(source)!r}: {error}") from None


def saved_scheduler(source: str | os.PathLike) -> Any:
    """The scheduler a model or expert saved (its class and config): what it was trained to be sampled with."""
    config = read_scheduler_config(source)
    return make_scheduler(str(config.get("_class_name", "EulerDiscreteScheduler")), config)


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latent means `vae.encode(x).latent_dist.mean * scaling_factor` of a [B, 3, H, W] batch in
    [-1, 1], computed in the VAE's dtype on its device: what training caches and validation encodes."""
    parameter = next(vae.parameters())
    posterior = vae.encode(pixels.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


def make_scheduler(class_name: str, config: dict[str, Any]) -> Any:
    """Instantiate a diffusers scheduler class by name from a config dict."""
    import diffusers

    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ModelError(f"unknown scheduler class {class_name!r} in the model's scheduler config")
    return scheduler_class.from_config(config)


def sdxl_pipeline(*, refiner: bool, vae: Any, text_encoder_1: Any, text_encoder_2: Any, tokenizer_1: Any,
                  tokenizer_2: Any, unet: Any, scheduler: Any) -> Any:
    """The plain diffusers pipeline a layout is saved as: `StableDiffusionXLPipeline` for the base layout,
    `StableDiffusionXLImg2ImgPipeline` with `requires_aesthetics_score=True` and no text encoder 1 nor tokenizer 1
    for the refiner layout, as the SDXL refiner itself is saved."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, tokenizer=tokenizer_1,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def save_expert_pipeline(
    components: SDXLComponents,
    unet: Any,
    scheduler: Any,
    expert: ExpertDescription,
    destination: str | os.PathLike,
) -> Path:
    """Write a plain diffusers SDXL pipeline of the trained expert, plus expert.json, atomically.

    A base-layout expert is a `StableDiffusionXLPipeline`; a refiner-layout one a
    `StableDiffusionXLImg2ImgPipeline` with `requires_aesthetics_score=True` and no text encoder 1, as the SDXL
    refiner is saved. Text encoders are reloaded from the source when they were released for training.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    same = {"use_safetensors": True, "revision": components.revision, "variant": components.variant}
    text_2 = components.text_encoder_2 or _load(CLIPTextModelWithProjection, components.source, "text_encoder_2", **same)
    text_1 = None if components.is_refiner else (
        components.text_encoder_1 or _load(CLIPTextModel, components.source, "text_encoder", **same))
    pipeline = sdxl_pipeline(refiner=components.is_refiner, vae=components.vae, text_encoder_1=text_1,
                             text_encoder_2=text_2, tokenizer_1=components.tokenizer_1,
                             tokenizer_2=components.tokenizer_2, unet=unet, scheduler=scheduler)
    with staged_directory(destination) as staged:
        pipeline.save_pretrained(str(staged), safe_serialization=True)
        expert.write(staged)
    log.info("saved expert pipeline to %s", destination)
    return Path(destination)
