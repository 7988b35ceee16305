"""Chained generation: the highest-noise expert starts from pure noise, each next one continues.

Each expert is a plain diffusers SDXL pipeline directory holding `expert.json`; the first runs as
`StableDiffusionXLPipeline(..., denoising_end=...)`, the others as
`StableDiffusionXLImg2ImgPipeline(..., denoising_start=..., denoising_end=...)` — the recipe's snippet.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand, order_chain, partition_problems
from expertune.io_utils import atomic_write_bytes
from expertune.models.sdxl import EXPERT_FILE

log = logging.getLogger("expertune.infer")

PARAMETERISATION_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "num_train_timesteps")


@dataclass(frozen=True)
class ExpertInfo:
    path: Path
    band: ExpertBand
    description: dict[str, Any]

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
    info_file = root / EXPERT_FILE
    if not info_file.is_file():
        raise ModelError(f"{path} is not an expertune expert: {info_file} is missing")
    try:
        description = json.loads(info_file.read_text(encoding="utf-8"))
        lo, hi = description["timestep_range"]
        band = ExpertBand(int(lo), int(hi), int(description["num_train_timesteps"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{info_file} is not a valid expert description: {error}") from None
    return ExpertInfo(root, band, description)


def check_chain(experts: Sequence[ExpertInfo]) -> list[ExpertInfo]:
    """Order experts by band (highest noise first); refuse gaps, overlaps and mixed parameterisations."""
    if not experts:
        raise ConfigError("generate needs at least one --expert")
    first = experts[0]
    for other in experts[1:]:
        for key in PARAMETERISATION_KEYS:
            if first.description.get(key) != other.description.get(key):
                raise ConfigError(
                    f"experts disagree on {key}: {first.path} has {first.description.get(key)!r}, "
                    f"{other.path} has {other.description.get(key)!r}; chain experts trained with the same "
                    "parameterisation"
                )
    problems = partition_problems([e.band for e in experts])
    if problems:
        listed = ", ".join(f"{e.path} {e.band}" for e in experts)
        raise ConfigError(f"experts do not tile the schedule ({'; '.join(problems)}): {listed}")
    return [experts[i] for i in order_chain([e.band for e in experts])]


class _Pipelines:
    """Loads each expert as a text-to-image pipeline; LoRA experts share one loaded base model."""

    def __init__(self, dtype: torch.dtype, device: str) -> None:
        self.dtype, self.device = dtype, device
        self.bases: dict[str, Any] = {}

    def _load(self, source: str | Path) -> Any:
        from diffusers import StableDiffusionXLPipeline

        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(source), dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise ModelError(f"could not load the SDXL pipeline {source}: {error}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def text_to_image(self, expert: ExpertInfo, index: int) -> Any:
        if not expert.is_lora:
            return self._load(expert.path)
        base = str(expert.description.get("base_model", ""))
        if base not in self.bases:
            self.bases[base] = self._load(base)
        pipe = self.bases[base]
        name = f"expert_{index}"
        if name not in pipe.get_list_adapters().get("unet", []):
            pipe.load_lora_weights(str(expert.path), adapter_name=name)
        pipe.set_adapters([name])
        pipe.scheduler = _saved_scheduler(expert.path)
        return pipe


def _saved_scheduler(expert_dir: Path) -> Any:
    from diffusers import DDPMScheduler

    from expertune.models.sdxl import make_scheduler

    config = dict(DDPMScheduler.load_config(str(expert_dir), subfolder="scheduler"))
    return make_scheduler(str(config.get("_class_name", "EulerDiscreteScheduler")), config)


def generate(
    expert_paths: Sequence[str | os.PathLike],
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Any:
    """Run the chain and return the final PIL image.

    Full experts are loaded as their own pipelines; LoRA experts are adapters activated in turn on their
    shared base model. Each stage runs with the scheduler saved with its expert.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    chain = check_chain([read_expert(p) for p in expert_paths])
    pipelines = _Pipelines(dtype, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    common = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        generator=generator,
    )
    latents: Any = None
    for position, expert in enumerate(chain):
        output_type = "pil" if position == len(chain) - 1 else "latent"
        log.info("expert %d/%d %s: %s", position + 1, len(chain), expert.band, expert.path)
        pipe = pipelines.text_to_image(expert, position)
        if position == 0:
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            latents = pipe(
                **common, height=height or size, width=width or size,
                denoising_end=expert.band.denoising_end, output_type=output_type,
            ).images
        else:
            refine = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False,
                                                      force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
            refine.set_progress_bar_config(disable=True)
            latents = refine(
                **common, image=latents, denoising_start=expert.band.denoising_start,
                denoising_end=expert.band.denoising_end, output_type=output_type,
            ).images
    return latents[0]


def save_png(image: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
