"""The training loop of one expert, top to bottom.

prepare (model, band, schedule, caches) → steps (accumulate, clip, step, log) → validate → save.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertune.data.batches import (
    MicroBatch,
    batches_per_epoch,
    caption_for,
    collate,
    drop_captions,
    micro_batches,
)
from expertune.errors import ConfigError, ExpertuneError
from expertune.experts import ExpertBand, band_from_settings, expert_summary
from expertune.io_utils import atomic_write_json
from expertune.models.sdxl import load_components, make_scheduler, save_expert_pipeline
from expertune.schedule import NoiseSchedule
from expertune.train.loss import TrainingBatch, denoising_loss
from expertune.train.metrics import MetricsLog
from expertune.train.optim import build_lr_scheduler, build_optimizer
from expertune.train.prepare import PreparedData, prepare_data

log = logging.getLogger("expertune.train")

RUN_MARKERS = ("run.json", "metrics.jsonl", "pipeline")


@dataclass
class RunResult:
    output_dir: Path
    pipeline_dir: Path
    band: ExpertBand
    steps: int
    summary: dict[str, Any]


def noise_schedule_for(config: Any, scheduler_config: dict[str, Any]) -> NoiseSchedule:
    s = config.schedule
    return NoiseSchedule.from_scheduler_config(
        scheduler_config,
        prediction_type=s.prediction_type,
        rescale_betas_zero_snr=True if s.rescale_betas_zero_snr else None,
        training_timestep_spacing=s.training_scheduler_timestep_spacing,
        inference_timestep_spacing=s.inference_scheduler_timestep_spacing,
    )


def expert_band_for(config: Any, num_train_timesteps: int) -> ExpertBand:
    b = config.band
    try:
        return band_from_settings(
            num_train_timesteps,
            refiner_training=b.refiner_training,
            refiner_training_strength=b.refiner_training_strength,
            refiner_training_invert_schedule=b.refiner_training_invert_schedule,
            timestep_range=b.timestep_range,
        )
    except ValueError as error:
        raise ConfigError(f"expert band: {error}") from None


def total_optimizer_steps(config: Any, num_items: int, world_size: int) -> int:
    t = config.train
    if t.max_train_steps:
        return int(t.max_train_steps)
    epochs = t.num_train_epochs or 1
    micro = batches_per_epoch(num_items, t.train_batch_size, world_size) * epochs
    return max(1, -(-micro // t.gradient_accumulation_steps))


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Never mix a new run into an earlier one's outputs silently."""
    earlier = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(earlier)}); choose a new --output_dir "
            "or pass --overwrite_output_dir to replace it"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ExpertuneError(f"output_dir {output_dir} is not writable: {error.strerror}") from None
    if overwrite:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)


def load_batch(prepared: PreparedData, micro: MicroBatch) -> TrainingBatch:
    latents, time_ids, embeds = [], [], []
    for index in micro.indices:
        item = prepared.items[index]
        latent, ids = prepared.latent_cache.load(item.record, item.spec)
        latents.append(latent)
        time_ids.append(ids)
        embeds.append(prepared.embed_cache.load(caption_for(item, micro.epoch)))
    return collate(latents, time_ids, embeds)


def train(config: Any) -> RunResult:
    """Train one expert as `config` describes and save it as a diffusers pipeline with expert.json."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from expertune.validate.plan import build_plan
    from expertune.validate.samples import Validator

    config.require_for_training()
    started = time.monotonic()
    t, v = config.train, config.validation
    output_dir = Path(t.output_dir)
    check_output_dir(output_dir, t.overwrite_output_dir)
    logging_dir = Path(config.logging.logging_dir) if config.logging.logging_dir else output_dir / "logs"

    accelerator = Accelerator(
        mixed_precision=config.model.mixed_precision,
        log_with=None if config.logging.report_to == "none" else config.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    torch.manual_seed(t.seed)
    components = load_components(
        config.model.pretrained_model_name_or_path, revision=config.model.revision, variant=config.model.variant
    )
    schedule = noise_schedule_for(config, components.scheduler_config)
    for warning in schedule.warnings():
        log.warning(warning)
    band = expert_band_for(config, schedule.num_train_timesteps)
    log.info("expert band %s of %d timesteps, prediction_type=%s, zero-terminal SNR=%s",
             band, schedule.num_train_timesteps, schedule.prediction_type, schedule.rescale_betas_zero_snr)

    plan = build_plan(config, band, schedule, output_dir, device=accelerator.device)  # refuses a bad peer early
    for frozen in (components.vae, components.text_encoder_1, components.text_encoder_2):
        frozen.to(accelerator.device)
    prepared = prepare_data(config, components, extra_prompts=plan.prompts_to_cache)
    components.release_text_encoders()

    unet = components.unet
    unet.train()
    unet.requires_grad_(True)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    total_steps = total_optimizer_steps(config, len(prepared.items), accelerator.num_processes)
    optimizer = build_optimizer(unet.parameters(), t)
    lr_scheduler = build_lr_scheduler(optimizer, t, total_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    if accelerator.is_main_process and config.logging.report_to != "none":
        run_name = config.logging.tracker_run_name or config.logging.tracker_project_name
        accelerator.init_trackers(run_name, config=_tracker_config(config))
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    validator = Validator(config, plan, components, schedule, band, prepared, accelerator, output_dir, metrics)
    if v.validation_on_startup:
        validator.run(accelerator.unwrap_model(unet), 0)

    generator = torch.Generator().manual_seed(t.seed + 7919 * accelerator.process_index)
    stream = micro_batches(
        len(prepared.items), t.train_batch_size, t.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    accumulation = t.gradient_accumulation_steps
    stratified = config.band.timestep_sampling == "stratified"
    progress = tqdm(total=total_steps, desc=f"training {band}", disable=not accelerator.is_local_main_process)
    first_step_at: float | None = None
    last_record: dict[str, Any] = {}
    epoch = 0
    for step in range(1, total_steps + 1):
        step_started = time.monotonic()
        group = [next(stream) for _ in range(accumulation)]
        samples = sum(len(m.indices) for m in group)
        step_loss = torch.zeros((), dtype=torch.float64)
        step_timesteps = []
        for position, micro in enumerate(group):
            batch = load_batch(prepared, micro).to(accelerator.device)
            batch = drop_captions(batch, config.data.caption_dropout_probability, generator)
            last = position == len(group) - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(unet)
            with sync, accelerator.autocast():
                out = denoising_loss(unet, batch, band, schedule, generator, stratified=stratified)
                weight = batch.size / samples
                accelerator.backward(out.loss * weight)
            step_loss += out.loss.detach().double().cpu() * weight
            step_timesteps.append(out.timesteps.detach())
        grad_norm = None
        if t.max_grad_norm and t.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch = group[-1].epoch

        timesteps = torch.cat(step_timesteps)
        lr = lr_scheduler.get_last_lr()[0]
        record = {
            "step": step,
            "epoch": epoch,
            "loss": float(step_loss),
            "lr": float(lr),
            "timestep_min": int(timesteps.min()),
            "timestep_max": int(timesteps.max()),
            "samples": samples,
            "seconds": round(time.monotonic() - step_started, 4),
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if first_step_at is None:
            first_step_at = time.monotonic() - started
        if accelerator.is_main_process:
            metrics.write(record)
            accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"],
                             **({"train/grad_norm": record["grad_norm"]} if grad_norm is not None else {})},
                            step=step)
        last_record = record
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", step=step)
        if v.validation_step_interval and step % v.validation_step_interval == 0 and step < total_steps:
            validator.run(accelerator.unwrap_model(unet), step)
    progress.close()

    accelerator.wait_for_everyone()
    final_unet = accelerator.unwrap_model(unet)
    final_unet.eval()
    validation_files = validator.run(final_unet, total_steps)
    metrics.close()
    pipeline_dir = output_dir / "pipeline"
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        scheduler = make_scheduler(components.scheduler_class, schedule.scheduler_config(components.scheduler_config))
        expert = expert_summary(band, schedule.describe())
        expert["base_model"] = components.source
        save_expert_pipeline(components, final_unet, scheduler, expert, pipeline_dir)
        summary = {
            "format_version": 1,
            "expert": expert,
            "steps": total_steps,
            "epochs_started": epoch + 1,
            "samples_per_epoch": len(prepared.items),
            "final": last_record,
            "cache": prepared.cache_stats,
            "skipped_images": prepared.skipped,
            "validation_images": [str(p) for p in validation_files],
            "seconds": {
                "total": round(time.monotonic() - started, 3),
                "to_first_step": round(first_step_at or 0.0, 3),
            },
            "peak_memory_gib": peak_memory_gib(accelerator.device),
            "config": config.to_dict(),
            "versions": _versions(),
        }
        atomic_write_json(output_dir / "run.json", summary)
    accelerator.end_training()
    log.info("done: %d steps, expert %s saved to %s", total_steps, band, pipeline_dir)
    return RunResult(output_dir, pipeline_dir, band, total_steps, summary)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and peak allocated accelerator memory where there is one."""
    import resource

    peaks = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        peaks["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peaks


def _tracker_config(config: Any) -> dict[str, Any]:
    flat = config.flat()
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    import expertune

    return {
        "expertune": expertune.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
