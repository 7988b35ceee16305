"""Judging chains of experts on the world: samples, a colour judge, the CLIP score, the chain's held-out loss.

A chain is a list of `ChainStage`s (highest noise first). `expert_stages` loads trained experts from disk;
`base_stages` chains the pretrained base with itself at the same hand-off (the "before" of a fine-tune).
The held-out loss of a chain scores each timestep with the expert that owns it, at fixed noise, through the
same `HeldOutLoss` that validation uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from expertune.experts import ExpertBand
from expertune.infer.chain import ChainStage, chain_components, check_chain, denoise_chain, read_expert
from expertune.validate.metrics import ClipScorer
from expertune.world.scene import parse_caption, read_colours


def _pipeline_components(path: str | os.PathLike) -> dict:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return chain_components(pipe)


def expert_stages(paths: Sequence[str | os.PathLike], guidance: float = 5.0, rescale: float = 0.7) -> list[ChainStage]:
    """Trained experts (pipeline dirs or training output dirs), chained in band order."""
    chain = check_chain([read_expert(p) for p in paths])
    return [ChainStage(_pipeline_components(e.path), e.band, guidance, rescale) for e in chain]


def base_stages(base: str | os.PathLike, boundary: int = 350, guidance: float = 5.0,
                rescale: float = 0.0) -> list[ChainStage]:
    """The pretrained base chained with itself at `boundary`: its own weights and scheduler on both sides."""
    components = _pipeline_components(base)
    steps = int(components["scheduler"].config.num_train_timesteps)
    return [ChainStage(components, ExpertBand(boundary, steps - 1, steps), guidance, rescale),
            ChainStage(components, ExpertBand(0, boundary - 1, steps), guidance, rescale)]


def sample_chain(stages: Sequence[ChainStage], prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                 batch: int = 16) -> list[Image.Image]:
    """One image per prompt; image i starts from the noise of seed `seed + i` (same noise in every chain).

    No negative prompt is passed, so the unconditional branch is zeros (`force_zeros_for_empty_prompt`), the
    input caption dropout trained; an encoded "" would be an input the model never saw.
    """
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images += list(denoise_chain(stages, {"prompt": chunk},
                                         num_inference_steps=steps, generator=generators))
    return images


@dataclass(frozen=True)
class ColourScore:
    shape_colour: float  # share of images whose centre is the prompt's shape colour
    background: float  # share whose border is the prompt's background colour
    both: float

    def as_dict(self) -> dict[str, float]:
        return {"colour/shape": self.shape_colour, "colour/background": self.background, "colour/both": self.both}


def colour_accuracy(images: Sequence[Image.Image], prompts: Sequence[str]) -> ColourScore:
    """The outside judge's reading: does the centre show the shape's colour and the border the background's?"""
    fg, bg = [], []
    for image, prompt in zip(images, prompts):
        wanted = parse_caption(prompt)
        centre, border = read_colours(image)
        fg.append(centre == wanted.fg)
        bg.append(border == wanted.bg)
    both = [a and b for a, b in zip(fg, bg)]
    return ColourScore(float(np.mean(fg)), float(np.mean(bg)), float(np.mean(both)))


def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], scorer: ClipScorer) -> float:
    """Mean CLIP score (torchmetrics, 0..100) of the images against their prompts; load `scorer` once per model
    (`ClipScorer(world / "clip")`) and reuse it."""
    return float(np.mean([scorer.score(image, prompt) for image, prompt in zip(images, prompts)]))


def held_out_samples(stage: ChainStage, images: Sequence[Image.Image], prompts: Sequence[str]):
    """Held-out images as training sees them (scaled latents, SDXL time ids, text embeddings)."""
    from expertune.cache.embeds import encode_prompts
    from expertune.models.sdxl import encode_latents
    from expertune.validate.metrics import HeldOutSample

    c = stage.components
    pixels = torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images])
    pixels = pixels.float().div(127.5).sub(1.0)
    with torch.no_grad():
        latents = encode_latents(c["vae"], pixels)
    embeds, pooled = encode_prompts([c["tokenizer"], c["tokenizer_2"]], [c["text_encoder"], c["text_encoder_2"]],
                                    list(prompts))
    h, w = pixels.shape[-2:]
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
    return [HeldOutSample(latent, time_ids, e, p) for latent, e, p in zip(latents, embeds, pooled)]


def chain_subbands(boundaries: Sequence[int] = (350,), num_train_timesteps: int = 1000, count: int = 8) -> list[ExpertBand]:
    """`count` sub-bands of [0, N-1] that never straddle a hand-off, lowest first.

    Each expert's band gets a share in proportion to its size (at least one): [0, 349] + [350, 999] at 8 is
    3 + 5. The same cut serves every arm of a comparison, a single model included.
    """
    from expertune.experts import sub_bands

    cuts = [0, *sorted(boundaries), num_train_timesteps]
    bands = [ExpertBand(lo, hi - 1, num_train_timesteps) for lo, hi in zip(cuts, cuts[1:])]
    shares = [max(1, round(count * b.size / num_train_timesteps)) for b in bands]
    return [sub for band, share in zip(bands, shares) for sub in sub_bands(band, share)]


def chain_held_out_loss(stages: Sequence[ChainStage], samples, schedule, subbands: Sequence[ExpertBand], *,
                        timesteps_per_subband: int = 4, seed: int = 0) -> dict[str, float]:
    """The chain's held-out loss per sub-band, each timestep scored by the expert that owns it, at fixed noise.

    A sub-band that straddles a hand-off (a chain with more experts than the sub-bands were cut for) is cut at
    the hand-off; its loss is the mean of the pieces' losses weighted by their sizes, each piece scored by its
    owner with a share of the sub-band's timesteps.
    """
    from expertune.validate.metrics import HeldOutLoss, loss_key

    result: dict[str, float] = {}
    for sub in subbands:
        pieces = [(stage, ExpertBand(max(sub.lo, stage.band.lo), min(sub.hi, stage.band.hi), sub.num_train_timesteps))
                  for stage in stages if stage.band.lo <= sub.hi and sub.lo <= stage.band.hi]
        if sum(piece.size for _, piece in pieces) != sub.size:
            raise ValueError(f"the experts of the chain do not cover sub-band {sub}")
        total = 0.0
        for stage, piece in pieces:
            count = timesteps_per_subband if len(pieces) == 1 else max(1, round(timesteps_per_subband * piece.size / sub.size))
            measured = HeldOutLoss(samples, piece, schedule, subbands=1, timesteps_per_subband=count,
                                   seed=seed + piece.lo)
            values = measured(stage.components["unet"], "cpu")
            total += values[loss_key(piece)] * piece.size / sub.size
        result[loss_key(sub)] = total
    result["eval/loss"] = float(np.mean(list(result.values())))
    return result
