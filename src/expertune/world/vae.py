"""The world's VAE: an SDXL-layout AutoencoderKL (4 blocks, 8x, 4 latent channels) fitted to world images.

Training draws fresh scenes every step (the world is procedural, so there is no fixed training set to
overfit), mostly as 32 px crops (four times cheaper than whole images, and a fully convolutional VAE does
not care), then whole images at the end so the mid-block attention and norms see the full latent grid.
The loss is L1 + MSE in pixel space with a tiny KL term, so flat colours come back at their exact hue.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expertune.models.layouts import vae_config
from expertune.world.optim import warmup_cosine
from expertune.world.scene import IMAGE_SIZE, Combination, render_batch, scenes

log = logging.getLogger(__name__)

WORLD_VAE_BLOCKS = (16, 32, 64, 64)
KL_WEIGHT = 1e-6


@dataclass(frozen=True)
class VaeRecipe:
    crop_steps: int = 2400
    full_steps: int = 1000
    crop_batch: int = 16
    full_batch: int = 8
    crop_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0


def world_vae_config() -> dict:
    return vae_config(WORLD_VAE_BLOCKS, layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
                      force_upcast=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR in dB over images in [-1, 1] (data range of the [0, 1] images: 1)."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def _crops(images: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    out = []
    for image in images:
        y, x = rng.randrange(0, image.shape[1] - size + 1), rng.randrange(0, image.shape[2] - size + 1)
        out.append(image[:, y:y + size, x:x + size])
    return torch.stack(out)


def train_vae(combinations: list[Combination], recipe: VaeRecipe, log_every: int = 100) -> tuple[Any, list[dict]]:
    """Fit a world VAE; returns (AutoencoderKL, loss log rows)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    vae = AutoencoderKL(**world_vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    total = recipe.crop_steps + recipe.full_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total))
    rows: list[dict] = []
    vae.train()
    for step in range(total):
        full = step >= recipe.crop_steps
        batch = recipe.full_batch if full else recipe.crop_batch
        chosen = [rng.choice(combinations) for _ in range(batch)]
        images = to_tensor(render_batch(scenes(chosen, 1, rng.randrange(2**31))[:batch]))
        if not full:
            images = _crops(images, recipe.crop_size, rng)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = reconstruction - images
        loss = error.abs().mean() + error.pow(2).mean() + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == total - 1:
            rows.append({"part": "vae", "step": step, "loss": round(float(loss.detach()), 6),
                         "psnr_db": round(psnr(reconstruction.detach(), images), 3)})
            log.info("vae step %d/%d loss %.5f psnr %.2f dB", step, total, rows[-1]["loss"], rows[-1]["psnr_db"])
    vae.eval()
    return vae, rows


@torch.no_grad()
def evaluate_vae(vae, images: np.ndarray, batch: int = 32) -> dict[str, float]:
    """PSNR of mean-latent reconstructions and the latents' standard deviation (for scaling_factor)."""
    values, latents = [], []
    for start in range(0, len(images), batch):
        x = to_tensor(images[start:start + batch])
        mean = vae.encode(x).latent_dist.mean
        latents.append(mean)
        values.append(psnr(vae.decode(mean).sample, x) * len(x))
    stacked = torch.cat(latents)
    return {"psnr_db": sum(values) / len(images), "latent_std": float(stacked.std()),
            "latent_mean": float(stacked.mean())}
