"""Stage-aware validation images.

- A band that holds t = N-1 (stage 1) is validated by text-to-image that stops at the band's hand-off
  (`denoising_end`), decoded, so the user sees exactly what this expert hands over.
- A band that does not (stage 2) is validated on real dataset images: the cached latent is noised to the
  first inference timestep below the band's top, then denoised from there (img2img with
  `denoising_start`, which adds no noise itself). Saved as a grid: input | noised | output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from expertune.data.buckets import BucketRule
from expertune.experts import ExpertBand
from expertune.io_utils import atomic_write_bytes
from expertune.models.sdxl import SDXLComponents, make_scheduler
from expertune.schedule import NoiseSchedule

log = logging.getLogger("expertune.validate")

MAX_DATASET_IMAGES = 2


def first_timestep_below(scheduler: Any, num_inference_steps: int, band: ExpertBand) -> torch.Tensor:
    """The first inference timestep the expert runs, as diffusers computes it from `denoising_start`."""
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    if band.denoising_start is None:
        return timesteps[:1]
    cutoff = int(round(band.num_train_timesteps - band.denoising_start * band.num_train_timesteps))
    below = timesteps[timesteps < cutoff]
    return below[:1]


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grid(images: list[Image.Image]) -> Image.Image:
    width = sum(i.width for i in images)
    height = max(i.height for i in images)
    canvas = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


class Validator:
    """Makes validation images for one expert at chosen steps; main process only."""

    def __init__(self, config: Any, components: SDXLComponents, schedule: NoiseSchedule, band: ExpertBand,
                 prepared: Any, accelerator: Any, output_dir: Path) -> None:
        self.config = config
        self.v = config.validation
        self.components = components
        self.schedule = schedule
        self.band = band
        self.prepared = prepared
        self.accelerator = accelerator
        self.output_dir = output_dir

    def _scheduler(self) -> Any:
        return make_scheduler(
            self.components.scheduler_class, self.schedule.scheduler_config(self.components.scheduler_config)
        )

    def _conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Cached embeddings of the prompts; the negative branch is the negative prompt's, or zeros as
        SDXL pipelines use for an empty negative prompt (and caption dropout trains)."""
        embeds = [self.prepared.embed_cache.load(p) for p in prompts]
        prompt_embeds = torch.stack([e[0] for e in embeds])
        pooled = torch.stack([e[1] for e in embeds])
        if self.v.validation_negative_prompt:
            negative, negative_pooled = self.prepared.embed_cache.load(self.v.validation_negative_prompt)
            negative = negative.expand_as(prompt_embeds)
            negative_pooled = negative_pooled.expand_as(pooled)
        else:
            negative, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        device = self.accelerator.device
        return {
            "prompt_embeds": prompt_embeds.to(device),
            "pooled_prompt_embeds": pooled.to(device),
            "negative_prompt_embeds": negative.to(device),
            "negative_pooled_prompt_embeds": negative_pooled.to(device),
        }

    def _validation_items(self) -> list[Any]:
        candidates = [item for item in self.prepared.unique_items if not item.spec.disable_validation]
        if not candidates:
            return []
        seed = self.v.validation_seed if self.v.validation_seed is not None else self.config.train.seed
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
        return [candidates[i] for i in order[:MAX_DATASET_IMAGES]]

    def run(self, unet: Any, step: int) -> list[Path]:
        if self.v.validation_disable or not self.accelerator.is_main_process:
            return []
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                if self.band.holds_start:
                    images = self._text_to_image(unet)
                else:
                    images = self._partial_denoise(unet)
        finally:
            unet.train(was_training)
        written = []
        folder = self.output_dir / "validation" / f"step_{step:06d}"
        for name, image in images:
            path = folder / f"{name}.png"
            atomic_write_bytes(path, _png_bytes(image))
            written.append(path)
            self._log_image(name, image, step)
        log.info("validation at step %d: %d images in %s", step, len(written), folder)
        return written

    def _log_image(self, name: str, image: Image.Image, step: int) -> None:
        if self.config.logging.report_to != "tensorboard":
            return
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image(f"validation/{name}", np.asarray(image), step, dataformats="HWC")

    def _generator(self) -> torch.Generator:
        seed = self.v.validation_seed if self.v.validation_seed is not None else self.config.train.seed
        return torch.Generator().manual_seed(seed)

    def _text_to_image(self, unet: Any) -> list[tuple[str, Image.Image]]:
        from diffusers import StableDiffusionXLPipeline

        prompts = [self.v.validation_prompt] if self.v.validation_prompt else [
            item.captions[0] for item in self._validation_items()
        ]
        if not prompts:
            return []
        pipe = StableDiffusionXLPipeline(
            vae=self.components.vae, text_encoder=None, text_encoder_2=None,
            tokenizer=self.components.tokenizer_1, tokenizer_2=self.components.tokenizer_2,
            unet=unet, scheduler=self._scheduler(),
        )
        pipe.set_progress_bar_config(disable=True)
        size = self.v.validation_resolution or BucketRule(self.config.data.resolution,
                                                          self.config.data.resolution_type).square_edge()
        result = []
        for index, prompt in enumerate(prompts):
            image = pipe(
                **self._conditioning([prompt]),
                num_inference_steps=self.v.validation_num_inference_steps,
                guidance_scale=self.v.validation_guidance,
                guidance_rescale=self.v.validation_guidance_rescale,
                denoising_end=self.band.denoising_end,
                height=size, width=size,
                generator=self._generator(),
            ).images[0]
            result.append((f"text_to_image_{index:02d}", image))
        return result

    def _partial_denoise(self, unet: Any) -> list[tuple[str, Image.Image]]:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        items = self._validation_items()
        if not items:
            log.warning("no dataset image is available for stage-2 validation; skipped")
            return []
        scheduler = self._scheduler()
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=self.components.vae, text_encoder=None, text_encoder_2=None,
            tokenizer=self.components.tokenizer_1, tokenizer_2=self.components.tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
        )
        pipe.set_progress_bar_config(disable=True)
        steps = self.v.validation_num_inference_steps
        start = first_timestep_below(scheduler, steps, self.band)
        vae = self.components.vae
        result = []
        for index, item in enumerate(items):
            latent, _ = self.prepared.latent_cache.load(item.record, item.spec)
            x0 = latent.unsqueeze(0).to(self.accelerator.device)
            generator = self._generator()
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            noised = scheduler.add_noise(x0, noise, start)
            prompt = self.v.validation_prompt or item.captions[0]
            output = pipe(
                **self._conditioning([prompt]),
                image=noised,
                num_inference_steps=steps,
                denoising_start=self.band.denoising_start,
                denoising_end=self.band.denoising_end,
                guidance_scale=self.v.validation_guidance,
                guidance_rescale=self.v.validation_guidance_rescale,
                generator=generator,
            ).images[0]
            # Euler-type schedulers noise as x0 + σ ε; scale back to the DDPM form sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε to view it.
            alpha_bar = self.schedule.alphas_cumprod[int(start[0])].item()
            viewable = noised * alpha_bar**0.5 if hasattr(scheduler, "sigmas") else noised
            decoded = [self._decode(vae, x0), self._decode(vae, viewable), output]
            result.append((f"partial_denoise_{index:02d}", _grid(decoded)))
        return result

    @staticmethod
    def _decode(vae: Any, latents: torch.Tensor) -> Image.Image:
        image = vae.decode(latents / vae.config.scaling_factor).sample[0]
        array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)
