"""`expertune generate`: load a chain of experts once, then sample one prompt or a whole prompt set with it.

The experts are expert folders (or `ExpertInfo`s, such as the untouched base model of `infer.sources.base_expert`);
`load_chain` reads each from disk once (a LoRA expert as an adapter on its base, loaded once per base), optionally
with diffusers' model CPU offload; `run_chain` samples it for a prompt, with diffusers' progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from expertune.errors import ConfigError
from expertune.infer.chain import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    ChainStage,
    ExpertInfo,
    _per_expert,
    _PipelineLoader,
    chain_components,
    check_chain,
    denoise_chain,
    pipeline_flags,
    read_expert,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedChain:
    """The chain's stages in band order, where each entry of the given expert list went (`given[i]` is the stage
    of the i-th expert given), and the native image size of its first expert."""

    stages: list[ChainStage]
    given: list[int]
    size: int


def load_chain(
    experts: Sequence[str | os.PathLike | ExpertInfo],
    *,
    guidance_scale: float | Sequence[float] = 7.5,
    guidance_rescale: float | Sequence[float] = 0.0,
    scheduler: str = "saved",
    dtype: torch.dtype | None = None,
    device: str = "auto",
    aesthetic_score: float = AESTHETIC_SCORE,
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
    cpu_offload: bool = False,
) -> LoadedChain:
    """Read every expert once and build the chain (checked: bands that tile the schedule, one parameterisation)."""
    from expertune.infer.schedulers import scheduler_from_saved

    infos = [e if isinstance(e, ExpertInfo) else read_expert(e) for e in experts]
    scales = _per_expert(guidance_scale, len(infos), "--guidance")
    rescales = _per_expert(guidance_rescale, len(infos), "--guidance_rescale")
    chain = check_chain(infos)
    device = resolve_device(device)
    dtype = dtype if dtype is not None else resolve_dtype("auto", device)
    log.info("generating on %s in %s%s", device, str(dtype).replace("torch.", ""),
             " with model CPU offload" if cpu_offload else "")
    loader = _PipelineLoader(dtype, device, cpu_offload=cpu_offload)
    stages = []
    for index, expert in enumerate(chain):
        given = infos.index(expert)
        pipe, saved, adapter = loader.load(expert, index)
        components = chain_components(pipe)
        components["scheduler"] = scheduler_from_saved(scheduler, saved, str(expert.path))
        stages.append(ChainStage(components, expert.band, scales[given], rescales[given], adapter,
                                 aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                                 conditioning=None, **pipeline_flags(pipe)))
        log.info("expert %d/%d %s: %s (guidance %g, rescale %g, %s)", len(stages), len(chain), expert.band,
                 expert.name, scales[given], rescales[given], type(components["scheduler"]).__name__)
    first = stages[0].components
    size = first["unet"].config.sample_size * 2 ** (len(first["vae"].config.block_out_channels) - 1)
    return LoadedChain(stages, [chain.index(e) for e in infos], size)


def run_chain(loaded: LoadedChain, prompt: str | Sequence[str], *, negative_prompt: str | None = None,
              num_inference_steps: int = 30, num_images: int = 1, seed: int = 0, height: int | None = None,
              width: int | None = None, progress: bool = False, handoff_blend: int = 0) -> list[Any]:
    """`num_images` PIL images of `prompt` (one for every expert, or one per expert in the order they were given);
    image i starts from the noise of seed `seed + i`; `handoff_blend` W mixes both experts' predictions over W
    timesteps around each boundary (`infer.handoff`)."""
    if num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {num_images}")
    prompts = per_expert_prompts(prompt, len(loaded.given))
    own = [""] * len(loaded.stages)
    for given, stage_index in enumerate(loaded.given):
        own[stage_index] = prompts[given]
    stages = [dataclasses.replace(stage, conditioning={"prompt": text, "negative_prompt": negative_prompt})
              for stage, text in zip(loaded.stages, own)]
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    return list(denoise_chain(stages, stages[0].conditioning or {}, num_inference_steps=num_inference_steps,
                              generator=generators, height=height or loaded.size, width=width or loaded.size,
                              num_images_per_prompt=num_images, progress=progress, handoff_blend=handoff_blend))


def generate_images(
    expert_paths: Sequence[str | os.PathLike | ExpertInfo],
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float | Sequence[float] = 7.5,
    guidance_rescale: float | Sequence[float] = 0.0,
    scheduler: str = "saved",
    num_images: int = 1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    aesthetic_score: float = AESTHETIC_SCORE,
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
    cpu_offload: bool = False,
    progress: bool = False,
    handoff_blend: int = 0,
) -> list[Any]:
    """Load the chain and return `num_images` PIL images of `prompt` (see `load_chain` and `run_chain`).

    `prompt`, `guidance_scale` and `guidance_rescale` are one value for all experts or one per entry of
    `expert_paths`, in that order (the chain itself runs in band order). `scheduler` is "saved" (each expert's
    own) or a key of `SCHEDULER_CLASSES`, built from each expert's saved scheduler config. `device` "auto" is the
    GPU when there is one; `dtype` None is fp16 there and float32 on the CPU.
    """
    if num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {num_images}")
    per_expert_prompts(prompt, len(expert_paths))
    loaded = load_chain(expert_paths, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                        scheduler=scheduler, dtype=dtype, device=device, aesthetic_score=aesthetic_score,
                        negative_aesthetic_score=negative_aesthetic_score, cpu_offload=cpu_offload)
    return run_chain(loaded, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                     num_images=num_images, seed=seed, height=height, width=width, progress=progress,
                     handoff_blend=handoff_blend)


def generate_prompt_set(loaded: LoadedChain, prompts: Mapping[str, str], **options: Any) -> dict[str, list[Any]]:
    """Every prompt of a named set (a prompts file) through one loaded chain: {name: images}."""
    return {name: run_chain(loaded, text, **options) for name, text in prompts.items()}


def per_expert_prompts(prompt: str | Sequence[str], count: int) -> list[str]:
    """One prompt for every expert, or exactly one per expert."""
    listed = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(listed) == 1:
        return listed * count
    if len(listed) != count:
        raise ConfigError(f"--prompt was given {len(listed)} times for {count} experts; give it once (all experts) "
                          "or once per expert, in the order of --expert (chain order with --mixture)")
    return listed


def generate(expert_paths: Sequence[str | os.PathLike | ExpertInfo], prompt: str | Sequence[str],
             **options: Any) -> Any:
    """Run the chain and return one PIL image (see `generate_images` for the options)."""
    return generate_images(expert_paths, prompt, **options, num_images=1)[0]
