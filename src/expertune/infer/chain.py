"""Chained generation: the highest-noise expert starts from pure noise, each next one continues.

Each expert is a plain diffusers SDXL pipeline directory holding `expert.json`; the first runs as
`StableDiffusionXLPipeline(..., denoising_end=...)`, the others as
`StableDiffusionXLImg2ImgPipeline(..., denoising_start=..., denoising_end=...)` — the recipe's snippet.
`denoise_chain` is that loop over in-memory components: `expertune generate` feeds it pipelines loaded
from disk, validation feeds it the UNet being trained (and a peer expert's) with cached text embeddings.
`check_chain` is the one guard both use: same parameterisation, bands that tile the schedule.

An expert of the SDXL refiner layout (text encoder 2 only, `requires_aesthetics_score`; docs/refiner.md)
runs exactly as diffusers' refiner pipeline does: `StableDiffusionXLImg2ImgPipeline` with
`requires_aesthetics_score=True`, prompt embeddings of its own text encoder 2, and the time ids
(orig size, crop, `aesthetic_score`) / (..., `negative_aesthetic_score`). It continues a chain; it cannot
start one from pure noise (diffusers' text-to-image pipeline has no aesthetic-score time ids).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand, order_chain, partition_problems
from expertune.io_utils import atomic_write_bytes
from expertune.expert_format import EXPERT_FILE, ExpertDescription
from expertune.models.sdxl import saved_scheduler

log = logging.getLogger(__name__)

PARAMETERISATION_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "num_train_timesteps")


@dataclass(frozen=True)
class ExpertInfo:
    path: Path
    band: ExpertBand
    description: dict[str, Any]
    label: str | None = None  # how errors name the expert (default: its path)

    @property
    def name(self) -> str:
        return self.label or str(self.path)

    @property
    def is_lora(self) -> bool:
        return self.description.get("model_type") == "lora"


def read_expert(path: str | os.PathLike) -> ExpertInfo:
    """An expert dir (a full pipeline, or LoRA adapters), or a training output dir holding one."""
    root = Path(path)
    for kind in ("pipeline", "lora"):
        if (root / kind / EXPERT_FILE).is_file():
            root = root / kind
            break
    if not (root / EXPERT_FILE).is_file():
        raise ModelError(f"{path} is not an expertune expert: {root / EXPERT_FILE} is missing")
    description = ExpertDescription.read(root)
    return ExpertInfo(root, description.band, description.to_json())


def mixture_expert_paths(directory: str | os.PathLike) -> list[Path]:
    """The experts of the mixture in `directory` (its mixture.json, checked), in chain order."""
    from expertune.expert_format import MixtureDescription

    return MixtureDescription.read(directory).expert_dirs(directory)


def check_chain(experts: Sequence[ExpertInfo]) -> list[ExpertInfo]:
    """Order experts by band (highest noise first); refuse gaps, overlaps and mixed parameterisations.

    Every error names the experts and both values that disagree.
    """
    if not experts:
        raise ConfigError("generate needs at least one --expert")
    first = experts[0]
    for other in experts[1:]:
        for key in PARAMETERISATION_KEYS:
            if first.description.get(key) != other.description.get(key):
                raise ConfigError(
                    f"experts disagree on {key}: {first.name} has {first.description.get(key)!r}, "
                    f"{other.name} has {other.description.get(key)!r}; chain experts trained with the same "
                    "parameterisation"
                )
    problems = partition_problems([e.band for e in experts])
    if problems:
        listed = ", ".join(f"{e.name} {e.band}" for e in experts)
        raise ConfigError(f"experts do not tile the schedule ({'; '.join(problems)}): {listed}")
    return [experts[i] for i in order_chain([e.band for e in experts])]


AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLImg2ImgPipeline defaults
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass
class ChainStage:
    """One expert of a chain: pipeline components (`unet` and `scheduler` its own), band and guidance.

    `requires_aesthetics_score` marks a refiner-layout expert (its components hold no text encoder 1); it gets
    `aesthetic_score` / `negative_aesthetic_score` as time ids. `conditioning`, when set, replaces the chain's
    text conditioning for this stage (precomputed embeddings differ between the base and refiner layouts).
    """

    components: dict[str, Any]  # vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler
    band: ExpertBand
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    adapter: str | None = None  # a LoRA expert: the adapter to activate on the shared base UNet
    requires_aesthetics_score: bool = False
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    force_zeros_for_empty_prompt: bool = True
    conditioning: dict[str, Any] | None = None  # this expert's own prompt or embeddings (else the chain's)


def pipeline_flags(pipe: Any) -> dict[str, bool]:
    """The `ChainStage` flags a loaded pipeline's config sets (a text-to-image pipeline has no aesthetic score)."""
    config = pipe.config
    return {"requires_aesthetics_score": bool(config.get("requires_aesthetics_score", False)),
            "force_zeros_for_empty_prompt": bool(config.get("force_zeros_for_empty_prompt", True))}


def expert_layout_kind(expert: ExpertInfo) -> str:
    """"refiner" or "base": the layout of a saved expert's pipeline (of its base model for a LoRA expert)."""
    from expertune.models.sdxl import layout_kind_of, read_pipeline_index

    if not expert.is_lora:
        return layout_kind_of(read_pipeline_index(str(expert.path)))
    return layout_kind_of(read_pipeline_index(str(expert.description.get("base_model", "")),
                                              revision=expert.description.get("base_revision")))


def chain_components(pipe: Any) -> dict[str, Any]:
    """A loaded SDXL pipeline's components as a `ChainStage` takes them (no IP-adapter image encoder)."""
    components = dict(pipe.components)
    for optional in ("image_encoder", "feature_extractor"):
        components.pop(optional, None)
    return components


def denoise_chain(
    stages: Sequence[ChainStage],
    conditioning: dict[str, Any],
    *,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator],
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    progress: bool = False,
    handoff_blend: int = 0,
) -> Any:
    """Run `stages` in order; return the last pipeline's `.images` (PIL list, or latents for "latent").

    `conditioning` is what every pipeline call gets for the text: `prompt=`/`negative_prompt=` strings
    (each expert encodes them with its own text encoders) or precomputed `prompt_embeds=` etc.
    Without `latents` the first stage starts from pure noise (text-to-image); with `latents` — already
    noised to the first stage's top, as `denoising_start` expects (REFERENCE.md §4) — every stage runs
    img2img. A stage that is not the last hands over latents. `handoff_blend` W > 0 mixes both experts'
    predictions over a window of W timesteps around each boundary (`infer.handoff`).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if handoff_blend:
        from expertune.infer.handoff import blended_stages

        stages = blended_stages(stages, handoff_blend)

    images: Any = latents
    final_vae = stages[-1].components["vae"]
    # A VAE kept in float32 beside a half-precision UNet (force_upcast): decode here, in the VAE's dtype.
    decode_here = output_type != "latent" and final_vae.dtype != stages[-1].components["unet"].dtype
    if latents is None and stages[0].requires_aesthetics_score:
        raise ConfigError(
            f"the expert of band {stages[0].band} has the SDXL refiner layout (aesthetic-score time ids), which "
            "cannot start a chain from pure noise: put a base-layout expert above it, or give it images to "
            "continue (partial denoising)")
    for position, stage in enumerate(stages):
        last = position == len(stages) - 1
        common = dict(
            **(stage.conditioning if stage.conditioning is not None else conditioning),
            num_inference_steps=num_inference_steps,
            guidance_scale=stage.guidance_scale,
            guidance_rescale=stage.guidance_rescale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            denoising_end=stage.band.denoising_end,
            output_type=output_type if last and not decode_here else "latent",
        )
        if stage.adapter is not None:
            stage.components["unet"].set_adapters([stage.adapter])
        if images is None:
            pipe = StableDiffusionXLPipeline(**stage.components,
                                             force_zeros_for_empty_prompt=stage.force_zeros_for_empty_prompt)
            pipe.set_progress_bar_config(disable=not progress)
            images = pipe(**common, height=height, width=width).images
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(**stage.components,
                                                    requires_aesthetics_score=stage.requires_aesthetics_score,
                                                    force_zeros_for_empty_prompt=stage.force_zeros_for_empty_prompt)
            pipe.set_progress_bar_config(disable=not progress)
            images = pipe(**common, image=images, denoising_start=stage.band.denoising_start,
                          aesthetic_score=stage.aesthetic_score,
                          negative_aesthetic_score=stage.negative_aesthetic_score).images
        if last and decode_here:
            images = _decode(pipe, images, output_type)
        del pipe
    return images


def _decode(pipe: Any, latents: torch.Tensor, output_type: str) -> Any:
    """Latents -> images with the pipeline's VAE in its own dtype (float32 for an SDXL VAE: force_upcast)."""
    vae = pipe.vae
    config = vae.config
    latents = latents.to(vae.device, vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type=output_type)


def _per_expert(values: float | Sequence[float], count: int, flag: str) -> list[float]:
    """One value for every expert, or exactly one per expert."""
    listed = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(listed) == 1:
        return listed * count
    if len(listed) != count:
        raise ConfigError(
            f"{flag} was given {len(listed)} times for {count} experts; give it once (all experts) or once "
            "per --expert, in the same order"
        )
    return listed


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU; anything else is used as given."""
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: half precision (fp16) on a GPU, float32 on the CPU; else fp32, fp16 or bf16."""
    if dtype == "auto":
        return torch.float16 if device.split(":")[0] in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class _PipelineLoader:
    """Full experts load as their own pipelines; LoRA experts are adapters on one loaded base per model.

    Each expert directory (and each LoRA base) is read from disk once per invocation. Where the VAE's config
    asks for it (`force_upcast`, as the SDXL VAE does: it overflows in fp16) the VAE stays float32.
    """

    def __init__(self, dtype: torch.dtype, device: str, cpu_offload: bool = False) -> None:
        self.dtype, self.device, self.cpu_offload = dtype, device, cpu_offload
        self.bases: dict[str, Any] = {}
        self.loads: list[str] = []

    def _pipeline(self, source: str | Path, variant: str | None = None) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        from expertune.models.sdxl import REFINER_LAYOUT, layout_kind_of, read_pipeline_index

        refiner = layout_kind_of(read_pipeline_index(str(source))) == REFINER_LAYOUT
        pipeline_class = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
        try:
            pipe = pipeline_class.from_pretrained(str(source), dtype=self.dtype, use_safetensors=True, variant=variant)
        except (OSError, ValueError) as error:
            raise ModelError(f"could not load the SDXL pipeline {source}: {error}") from None
        self.loads.append(str(source))
        if self.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)
        if self.cpu_offload:  # diffusers' model offload: each model on the device only while it runs
            pipe.enable_model_cpu_offload(device=self.device)
            return pipe
        return pipe.to(self.device)

    def load(self, expert: ExpertInfo, index: int) -> tuple[Any, Any, str | None]:
        """(pipeline, the expert's saved scheduler, LoRA adapter name or None)."""
        if not expert.is_lora:
            pipe = self._pipeline(expert.path)
            return pipe, pipe.scheduler, None
        base = str(expert.description.get("base_model", ""))
        revision, variant = expert.description.get("base_revision"), expert.description.get("base_variant")
        key = f"{base}@{revision}:{variant}"  # the base as the expert was trained on it (--revision, --variant)
        if key not in self.bases:
            from expertune.infer.sources import local_model  # a hub id: from the local cache, never downloaded

            self.bases[key] = self._pipeline(local_model(base, revision=revision), variant=variant)
        pipe = self.bases[key]
        name = f"expert_{index}"
        from expertune.models.lora import load_adapter_expert  # LoRA / DoRA through diffusers, LoHa / LoKr peft

        load_adapter_expert(pipe, expert.path, name)
        return pipe, saved_scheduler(expert.path), name


def __getattr__(name: str) -> Any:
    """`generate_images`, `generate` and `per_expert_prompts` live in infer.generate (loaded on first use)."""
    if name in ("generate_images", "generate", "per_expert_prompts", "generate_prompt_set"):
        from expertune.infer import generate as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_grid(images: Sequence[Any], columns: int | None = None) -> Any:
    """Images pasted left to right, top to bottom; `columns` defaults to ceil(sqrt(count))."""
    from PIL import Image

    if not images:
        raise ValueError("no images for a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        canvas.paste(image, ((index % columns) * width, (index // columns) * height))
    return canvas


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Any, path: str | os.PathLike) -> Path:
    atomic_write_bytes(path, png_bytes(image))
    return Path(path)


def save_images(images: Sequence[Any], path: str | os.PathLike) -> list[Path]:
    """One image: `path`. Several: `STEM_00.png`, `STEM_01.png`, ... beside `path`, and their grid at `path`."""
    target = Path(path)
    if len(images) == 1:
        return [save_png(images[0], target)]
    written = [save_png(image, target.with_name(f"{target.stem}_{i:02d}{target.suffix or '.png'}"))
               for i, image in enumerate(images)]
    written.append(save_png(image_grid(images), target))
    return written
