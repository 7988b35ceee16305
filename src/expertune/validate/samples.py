"""Stage-aware validation: each expert is validated the way it will be used.

- A band that holds t = N-1 (stage 1) is validated by text-to-image that stops at the band's hand-off
  (`denoising_end`), decoded, so the user sees exactly what this expert hands over (`text_to_image_<name>`).
- Any other band (stage 2) continues from real images: dataset images (`--validation_using_datasets`, a
  seeded choice, from the latent cache) and `--validation_input` images (encoded with the VAE at validation
  time) are noised to the first inference timestep the band runs, then denoised from there (img2img with
  `denoising_start`, which adds no noise itself; REFERENCE.md §4). Saved as grids input | noised | output
  (`partial_denoise_NN`, `partial_denoise_input_<name>`).
- With `--validation_peer_expert`, the full chain through both experts as well (`chain_<name>`).
- An expert of the SDXL refiner layout is validated as the refiner is used: partial denoising through
  `StableDiffusionXLImg2ImgPipeline` with `requires_aesthetics_score`, its own (text encoder 2) embeddings
  and `--validation_aesthetic_score` / `--validation_negative_aesthetic_score` time ids. Its band must not
  hold t = N-1 (it cannot start from pure noise), and its peer must be of the same layout (a chain of a base
  and a refiner conditions each on its own text encoders: `expertune generate` runs it).

Each validation then measures the held-out loss per sub-band and, with `--evaluation_type clip`, the CLIP
score of every output against its prompt (`validate/metrics.py`). Images go to
`<output_dir>/validation/step_NNNNNN/`, images and numbers to TensorBoard and W&B (there also a table of name,
prompt, step and image per validation), numbers to metrics.jsonl.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from expertune.config.schema import parse_validation_resolutions
from expertune.data.buckets import BucketRule
from expertune.data.transforms import image_to_tensor, load_image, plan_crop
from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.infer.chain import ChainStage, denoise_chain, image_grid, png_bytes
from expertune.infer.schedulers import handoff_slice
from expertune.io_utils import atomic_write_bytes
from expertune.models.sdxl import SDXLComponents, encode_latents, make_scheduler, saved_scheduler
from expertune.schedule import NoiseSchedule, add_noise
from expertune.validate.metrics import HeldOutLoss, HeldOutSample
from expertune.validate.plan import ValidationPlan, ValidationPrompt

if TYPE_CHECKING:
    from expertune.config.schema import Config

log = logging.getLogger(__name__)

MAX_DATASET_IMAGES = 2
# The columns of the validation table logged to W&B at each validation (one row per image).
VALIDATION_TABLE_COLUMNS = ("name", "prompt", "step", "image")


@dataclass(frozen=True)
class SamplerSettings:
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    seed: int


@dataclass
class ValidationImage:
    name: str  # file stem, TensorBoard tag and CLIP-score key
    image: Image.Image  # what is saved (a grid for partial denoising)
    output: Image.Image  # what the expert made (scored against `prompt`)
    prompt: str


def validation_scheduler(scheduler_class: str, pretrained_config: dict[str, Any], schedule: NoiseSchedule) -> Any:
    """The sampler of validation images: the model's scheduler class with the trained parameterisation."""
    return make_scheduler(scheduler_class, schedule.scheduler_config(pretrained_config))


def first_timestep_below(scheduler: Any, num_inference_steps: int, band: ExpertBand) -> torch.Tensor:
    """The first inference timestep the expert runs in a chain (`infer.schedulers.handoff_slice`), as a
    one-element tensor of the scheduler's own timesteps; empty when none falls in the band."""
    chosen = handoff_slice(scheduler, num_inference_steps, band)
    return scheduler.timesteps[chosen][:1]


def partial_denoise(
    stage: ChainStage, x0: torch.Tensor, conditioning: dict[str, torch.Tensor], settings: SamplerSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise clean latents `x0` [B, 4, h, w] to the band's first inference timestep, denoise with the stage.

    Returns (noise ε, timestep t, output latents). The noised input is `scheduler.add_noise(x0, ε, t)`, the
    form the scheduler's own latents take (x0 + σε for Euler-type samplers).
    """
    scheduler = stage.components["scheduler"]
    start = first_timestep_below(scheduler, settings.num_inference_steps, stage.band)
    if start.numel() == 0:
        raise ValueError(f"no inference timestep of {settings.num_inference_steps} steps falls in band {stage.band}")
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    noised = scheduler.add_noise(x0, noise, start.repeat(x0.shape[0]))
    output = denoise_chain([stage], conditioning, num_inference_steps=settings.num_inference_steps,
                           generator=generator, latents=noised, output_type="latent")
    return noise, start, output


def decode(vae: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (scaled) → PIL images, as the pipelines' default post-processing does."""
    images = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side, left to right (one row of `infer.chain.image_grid`)."""
    return image_grid(images, columns=len(images))


def _check_layout_validation(components: SDXLComponents, band: ExpertBand, plan: ValidationPlan) -> None:
    """Refuse what a refiner-layout expert cannot be validated by (see the module doc), before any training."""
    from expertune.infer.chain import expert_layout_kind

    if components.is_refiner and band.holds_start:
        raise ConfigError(
            f"the model has the SDXL refiner layout (aesthetic-score time ids) and this expert's band {band} holds "
            f"the first timestep {band.hi}: a refiner cannot make validation images from pure noise. Train it on a "
            "low-noise band (--refiner_training, or --timestep_range below the top) or set --validation_disable")
    if plan.peer is None:
        return
    peer_kind = expert_layout_kind(plan.peer)
    if components.is_refiner and peer_kind == components.layout_kind:
        raise ConfigError(
            f"validation_peer_expert {plan.peer.path} and this run's model both have the SDXL refiner layout: one "
            "of two chained experts starts from pure noise, which a refiner cannot. Give the chain a base-layout "
            "expert at the top and chain the saved experts with `expertune generate`")
    if peer_kind != components.layout_kind:
        raise ConfigError(
            f"validation_peer_expert {plan.peer.path} has the SDXL {peer_kind} layout and this run's model the "
            f"{components.layout_kind} layout: validating their chain needs each expert's own text encoders, "
            "which a run does not hold. Drop --validation_peer_expert and chain the saved experts with "
            "`expertune generate`")


class Validator:
    """Validation images and metrics for one expert at chosen steps; main process only."""

    def __init__(self, config: Config, plan: ValidationPlan, components: SDXLComponents, schedule: NoiseSchedule,
                 band: ExpertBand, prepared: Any, accelerator: Any, output_dir: Path,
                 metrics: Any | None = None, expert_index: int | None = None, chain: Sequence[Validator] = (),
                 autocast: bool = False, handoff_blend: int = 0) -> None:
        self.config = config
        self.v = config.validation
        self.plan = plan
        self.components = components
        self.schedule = schedule
        self.band = band
        self.prepared = prepared
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.metrics = metrics  # a MetricsLog for metrics.jsonl, or None
        # A mixture's expert: its images in validation/step_N/expert_<k>/, its tracker keys under expert_<k>/.
        self.expert_index = expert_index
        self.label = "" if expert_index is None else f"expert_{expert_index}"
        # The first expert of a mixture draws the whole chain: the later experts' validators, in chain order, each
        # building and conditioning its own stage (its model's layout and cached text embeddings).
        self.chain = list(chain)
        self.autocast = autocast  # bfloat16 weights: the pipelines' float32 latents are cast under autocast
        self.handoff_blend = handoff_blend  # the mixture chain's blended hand-off window (infer/handoff.py)
        self.last_values: dict[str, float] = {}  # the metrics of the last validation
        self._peer: tuple[torch.dtype, Any] | None = None  # (dtype, UNet) of the peer expert, loaded on first use
        seed = self.v.validation_seed if self.v.validation_seed is not None else config.train.seed
        self.settings = SamplerSettings(self.v.validation_num_inference_steps, self.v.validation_guidance,
                                        self.v.validation_guidance_rescale, seed)
        edge = BucketRule(config.data.resolution, config.data.resolution_type).square_edge()
        # (width, height) of each validation size: validation_resolution's (several: validate at each).
        self.sizes = (parse_validation_resolutions(self.v.validation_resolution) if self.v.validation_resolution
                      else [(edge, edge)])
        self.held_out = self._held_out_loss() if prepared.eval_items and not self.v.validation_disable else None
        if not self.v.validation_disable:
            _check_layout_validation(components, band, plan)
        sources = self.v.validation_using_datasets or plan.inputs or plan.peer
        if not band.holds_start and not self.v.validation_disable and (self.v.validation_using_datasets or plan.inputs):
            steps = self.settings.num_inference_steps  # checked now, not at the first validation
            if first_timestep_below(self.scheduler(), steps, band).numel() == 0:
                raise ConfigError(f"validation_num_inference_steps={steps}: no inference timestep of the sampler falls in "
                                  f"band {band}, so partial denoising has nothing to run; use more steps")
        if not band.holds_start and not sources and not self.v.validation_disable:
            log.warning("expert %s continues from noised images but has none to validate on: set "
                        "--validation_using_datasets or --validation_input (or --validation_peer_expert)", band)

    # ---- inputs --------------------------------------------------------------------------------

    def scheduler(self) -> Any:
        return validation_scheduler(self.components.scheduler_class, self.components.scheduler_config,
                                    self.schedule)

    def _held_out_loss(self) -> HeldOutLoss:
        samples = []
        held_out, cap = self.prepared.eval_items, self.v.eval_holdout_max_images
        if len(held_out) > cap:
            log.info("held-out loss: scoring the first %d of %d held-out images (eval_holdout_max_images)", cap,
                     len(held_out))
        for item in held_out[:cap]:  # a cap: minutes, not hours, per validation
            latent, time_ids = self.prepared.latent_cache.load(item.record, item.spec)
            embeds, pooled = self.prepared.embed_cache.load(item.captions[0])
            samples.append(HeldOutSample(latent, time_ids, embeds, pooled))
        return HeldOutLoss(samples, self.band, self.schedule, subbands=self.v.eval_subbands,
                           timesteps_per_subband=self.v.eval_timesteps_per_subband, seed=self.settings.seed)

    def _conditioning(self, prompt: str) -> dict[str, torch.Tensor]:
        """Cached embeddings of the prompt; the negative branch is the negative prompt's, or zeros as SDXL
        pipelines use for an empty negative prompt (and caption dropout trains)."""
        embeds, pooled = (t.unsqueeze(0) for t in self.prepared.embed_cache.load(prompt))
        if self.plan.negative_prompt:
            negative, negative_pooled = (t.unsqueeze(0) for t in
                                         self.prepared.embed_cache.load(self.plan.negative_prompt))
        else:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        device = self.accelerator.device
        return {"prompt_embeds": embeds.to(device), "pooled_prompt_embeds": pooled.to(device),
                "negative_prompt_embeds": negative.to(device),
                "negative_pooled_prompt_embeds": negative_pooled.to(device)}

    def _dataset_items(self) -> list[Any]:
        candidates = [item for item in self.prepared.unique_items if not item.spec.disable_validation]
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.settings.seed)).tolist()
        return [candidates[i] for i in order[:MAX_DATASET_IMAGES]]

    def prompts(self) -> list[ValidationPrompt]:
        """The plan's prompts, or the captions of a seeded choice of dataset images."""
        if self.plan.prompts:
            return self.plan.prompts
        return [ValidationPrompt(f"caption_{i:02d}", item.captions[0]) for i, item in enumerate(self._dataset_items())]

    def _stage(self, unet: Any, band: ExpertBand, scheduler: Any) -> ChainStage:
        c = self.components
        parts = dict(vae=c.vae, text_encoder=None, text_encoder_2=None, tokenizer=c.tokenizer_1,
                     tokenizer_2=c.tokenizer_2, unet=unet, scheduler=scheduler)
        return ChainStage(parts, band, self.settings.guidance_scale, self.settings.guidance_rescale,
                          requires_aesthetics_score=c.requires_aesthetics_score,
                          aesthetic_score=self.v.validation_aesthetic_score,
                          negative_aesthetic_score=self.v.validation_negative_aesthetic_score)

    def _encode_input(self, path: Path) -> torch.Tensor:
        image = load_image(path)
        width, height = self.sizes[0]
        plan = plan_crop((image.height, image.width), (height, width), "center", 0, str(path))
        return encode_latents(self.components.vae, image_to_tensor(image, plan).unsqueeze(0)).float()

    # ---- images --------------------------------------------------------------------------------

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.settings.seed)

    def _chain_images(self, prefix: str, stages_for: Callable[[str], list[ChainStage]],
                      handoff_blend: int = 0) -> list[ValidationImage]:
        """Text-to-image of every validation prompt through the stages `stages_for(prompt)` gives, seeded alike."""
        result = []
        for prompt in self.prompts():
            for width, height in self.sizes:  # several sizes: each image named by its size
                image = denoise_chain(stages_for(prompt.text), self._conditioning(prompt.text),
                                      generator=self._generator(), num_inference_steps=self.settings.num_inference_steps,
                                      height=height, width=width, handoff_blend=handoff_blend)[0]
                size = f"_{width}x{height}" if len(self.sizes) > 1 else ""
                result.append(ValidationImage(f"{prefix}_{prompt.name}{size}", image, image, prompt.text))
        return result

    def text_to_image(self, unet: Any) -> list[ValidationImage]:
        stages = [self._stage(unet, self.band, self.scheduler())]
        return self._chain_images("text_to_image", lambda prompt: stages)

    def partial_denoise_images(self, unet: Any) -> list[ValidationImage]:
        sources: list[tuple[str, torch.Tensor, str]] = []
        if self.v.validation_using_datasets:
            for index, item in enumerate(self._dataset_items()):
                latent, _ = self.prepared.latent_cache.load(item.record, item.spec)
                sources.append((f"partial_denoise_{index:02d}", latent.unsqueeze(0), item.captions[0]))
        for entry in self.plan.inputs:
            sources.append((f"partial_denoise_input_{entry.name}", self._encode_input(entry.path), entry.prompt))
        result = []
        for name, x0, prompt in sources:
            x0 = x0.to(self.accelerator.device)
            stage = self._stage(unet, self.band, self.scheduler())
            noise, start, output = partial_denoise(stage, x0, self._conditioning(prompt), self.settings)
            # Shown in the DDPM form sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε, whatever form the sampler's latents take.
            viewable = add_noise(x0, noise, start.round().long().to(x0.device), self.schedule.alphas_cumprod)
            clean, noised, made = (decode(self.components.vae, x)[0] for x in (x0, viewable, output))
            result.append(ValidationImage(name, grid([clean, noised, made]), made, prompt))
        return result

    def peer_unet(self, dtype: torch.dtype) -> Any:
        """The peer expert's UNet, loaded once per run (and kept, on the validation device): a full expert's own
        UNet, or a LoRA expert's adapters merged into its base model's UNet."""
        if self._peer is not None and self._peer[0] == dtype:
            return self._peer[1]
        from diffusers import UNet2DConditionModel

        peer = self.plan.peer
        assert peer is not None
        if peer.is_lora:
            from diffusers import StableDiffusionXLPipeline

            base = str(peer.description.get("base_model", ""))
            loaded = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype,
                                                          revision=peer.description.get("base_revision"),
                                                          variant=peer.description.get("base_variant"))
            adapters, _ = StableDiffusionXLPipeline.lora_state_dict(str(peer.path))
            loaded.load_lora_adapter(adapters, prefix="unet", adapter_name="peer")
            loaded.fuse_lora()
            loaded.unload_lora()  # plain weights with the adapters merged in: no peft wrappers at validation
        else:
            loaded = UNet2DConditionModel.from_pretrained(str(peer.path), subfolder="unet", torch_dtype=dtype)
        loaded = loaded.to(self.accelerator.device).eval()
        self._peer = (dtype, loaded)
        log.info("validation peer %s loaded once for this run", peer.path)
        return loaded

    def chain_images(self, unet: Any) -> list[ValidationImage]:
        """Text-to-image through this expert and the peer, in band order, each with its own scheduler."""
        peer = self.plan.peer
        assert peer is not None
        peer_unet = self.peer_unet(next(unet.parameters()).dtype)
        return self._chain_images("chain", lambda prompt: [
            self._stage(peer_unet, e.band, saved_scheduler(peer.path)) if e is peer
            else self._stage(unet, self.band, self.scheduler()) for e in self.plan.chain])

    def mixture_chain_images(self, unets: Sequence[Any]) -> list[ValidationImage]:
        """Text-to-image through every expert of the mixture as they are now (`unets`, this expert's first), in chain
        order, each stage conditioned by its own expert's cached embeddings of the prompt."""
        owners = [self, *self.chain]

        def stages(prompt: str) -> list[ChainStage]:
            built = [owner._stage(unet, owner.band, owner.scheduler()) for unet, owner in zip(unets, owners)]
            for stage, owner in zip(built, owners):
                stage.conditioning = owner._conditioning(prompt)
            return built

        return self._chain_images("chain", stages, self.handoff_blend)

    # ---- one validation ------------------------------------------------------------------------

    def run(self, unet: Any, step: int, chain_unets: Sequence[Any] = ()) -> list[Path]:
        """Make and save the images, measure and log the metrics; returns the image files written. `chain_unets`:
        the later experts' UNets as they are now, for the first expert of a mixture (its chain images)."""
        if self.v.validation_disable or not self.accelerator.is_main_process:
            return []
        if len(chain_unets) != len(self.chain):
            raise ValueError(f"validation of a chain of {len(self.chain) + 1} experts got {len(chain_unets)} later UNets")
        if self.autocast:
            with self.accelerator.autocast():
                return self._run(unet, step, chain_unets)
        return self._run(unet, step, chain_unets)

    def _run(self, unet: Any, step: int, chain_unets: Sequence[Any]) -> list[Path]:
        started = time.monotonic()
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                images = self.text_to_image(unet) if self.band.holds_start else self.partial_denoise_images(unet)
                if self.plan.peer is not None:
                    images += self.chain_images(unet)
                if self.chain:
                    images += self.mixture_chain_images([unet, *chain_unets])
                values = (self.held_out(unet, self.accelerator.device, self.accelerator.autocast) if self.held_out
                          else {})
                if self.plan.clip is not None:
                    values.update(self.plan.clip.scores([(i.name, i.output, i.prompt) for i in images]))
        finally:
            unet.train(was_training)
        self.last_values = dict(values)
        folder = self.output_dir / "validation" / f"step_{step:06d}"
        if self.label:
            folder = folder / self.label
        written = []
        for item in images:
            path = folder / f"{item.name}.png"
            atomic_write_bytes(path, png_bytes(item.image))
            written.append(path)
        self._log_images(images, step)
        if values:
            self.accelerator.log({self._tag(k): v for k, v in values.items()}, step=step)
        if self.metrics is not None:
            own = {} if self.expert_index is None else {"expert": self.expert_index}
            self.metrics.write({"step": step, "kind": "validation", **own, **values,
                                "seconds": round(time.monotonic() - started, 4)})
        log.info("validation at step %d: %d images in %s%s", step, len(written), folder,
                 "".join(f", {k}={v:.4g}" for k, v in values.items() if k in ("eval/loss", "clip/mean")))
        return written

    def _log_images(self, images: list[ValidationImage], step: int) -> None:
        """Each image to TensorBoard; to W&B each image under its tag and one table of name, prompt, step and
        image per validation (through accelerate's tracker interface: `train.trackers` turns them into W&B's)."""
        report_to = self.config.logging.report_to
        if report_to in ("tensorboard", "all"):
            board = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for item in images:
                board.add_image(self._tag(f"validation/{item.name}"), np.asarray(item.image), step, dataformats="HWC")
        if report_to in ("wandb", "all") and images:
            wandb = self.accelerator.get_tracker("wandb")
            wandb.log_images({self._tag(f"validation/{item.name}"): [item.image] for item in images}, step=step)
            wandb.log_table(self._tag("validation/samples"), columns=list(VALIDATION_TABLE_COLUMNS),
                            data=[[item.name, item.prompt, step, item.image] for item in images], step=step)

    def _tag(self, key: str) -> str:
        """A tracker key, under the expert's label in a mixture (`expert_1/eval/loss`)."""
        return f"{self.label}/{key}" if self.label else key
