"""Load, check and save SDXL-family models (SDXL base, SSD-1B, any UNet of the same layout).

The one loading path is diffusers/transformers `from_pretrained(name_or_path)`, safetensors only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from expertune.errors import ModelError
from expertune.io_utils import staged_directory

if TYPE_CHECKING:
    from expertune.expert_format import ExpertDescription

log = logging.getLogger(__name__)


@dataclass
class SDXLComponents:
    """The parts of an SDXL-layout pipeline that training needs. Text encoders may be released."""

    source: str
    unet: Any
    vae: Any
    tokenizer_1: Any
    tokenizer_2: Any
    text_encoder_1: Any | None
    text_encoder_2: Any | None
    scheduler_config: dict[str, Any]
    scheduler_class: str

    def release_text_encoders(self) -> None:
        """Free the text encoders once every embedding is cached (they are GBs on real models)."""
        self.text_encoder_1 = None
        self.text_encoder_2 = None


def _load(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        local = Path(source).expanduser()
        if not local.exists() and (os.sep in source or source.startswith(".")):
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


def check_sdxl_layout(unet_layout: Any, text_width_1: int, text_width_2: int, pooled_width: int, source: str) -> None:
    """Refuse a model whose UNet is not SDXL-shaped (text_time conditioning, two text encoders)."""
    problems = []
    if getattr(unet_layout, "addition_embed_type", None) != "text_time":
        problems.append(
            f"unet addition_embed_type is {getattr(unet_layout, 'addition_embed_type', None)!r}, "
            "SDXL-layout models use 'text_time' (an SD 1.x/2.x UNet cannot be trained as an SDXL expert)"
        )
    if unet_layout.cross_attention_dim != text_width_1 + text_width_2:
        problems.append(
            f"unet cross_attention_dim {unet_layout.cross_attention_dim} != text encoder widths "
            f"{text_width_1} + {text_width_2}"
        )
    expected_projection = pooled_width + 6 * (unet_layout.addition_time_embed_dim or 0)
    if unet_layout.projection_class_embeddings_input_dim != expected_projection:
        problems.append(
            f"unet projection_class_embeddings_input_dim {unet_layout.projection_class_embeddings_input_dim} "
            f"!= pooled width {pooled_width} + 6 x addition_time_embed_dim"
        )
    if problems:
        raise ModelError(f"model {source!r} is not an SDXL-layout model: " + "; ".join(problems))


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
) -> SDXLComponents:
    """Load an SDXL-layout model's components from a local directory or hub id (safetensors only).

    `with_unet=False` reads only the UNet's config (to check the layout) and leaves `unet` None:
    what building the caches needs (`expertune cache`), without the UNet's gigabytes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common: dict[str, Any] = {"revision": revision}
    weights: dict[str, Any] = {**common, "variant": variant, "use_safetensors": True}
    text_1 = _load(CLIPTextModel, source, "text_encoder", **weights, dtype=dtype)
    text_2 = _load(CLIPTextModelWithProjection, source, "text_encoder_2", **weights, dtype=dtype)
    unet_loader = UNet2DConditionModel if with_unet else _ConfigOnly(UNet2DConditionModel)
    unet = _load(unet_loader, source, "unet", **weights, torch_dtype=dtype)
    check_sdxl_layout(unet.config, text_1.config.hidden_size, text_2.config.hidden_size,
                      text_2.config.projection_dim, source)
    vae = _load(AutoencoderKL, source, "vae", **weights, torch_dtype=dtype)
    tokenizer_1 = _load(CLIPTokenizer, source, "tokenizer", **common)
    tokenizer_2 = _load(CLIPTokenizer, source, "tokenizer_2", **common)
    scheduler_config = read_scheduler_config(source, revision=revision)
    for module in (text_1, text_2, vae):
        module.requires_grad_(False)
        module.eval()
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
    )


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


def save_expert_pipeline(
    components: SDXLComponents,
    unet: Any,
    scheduler: Any,
    expert: ExpertDescription,
    destination: str | os.PathLike,
) -> Path:
    """Write a plain diffusers SDXL pipeline of the trained expert, plus expert.json, atomically.

    Text encoders are reloaded from the source when they were released for training.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_1 = components.text_encoder_1 or _load(CLIPTextModel, components.source, "text_encoder", use_safetensors=True)
    text_2 = components.text_encoder_2 or _load(
        CLIPTextModelWithProjection, components.source, "text_encoder_2", use_safetensors=True
    )
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=text_1,
        text_encoder_2=text_2,
        tokenizer=components.tokenizer_1,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    with staged_directory(destination) as staged:
        pipeline.save_pretrained(str(staged), safe_serialization=True)
        expert.write(staged)
    log.info("saved expert pipeline to %s", destination)
    return Path(destination)
