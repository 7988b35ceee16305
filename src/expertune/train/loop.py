"""The training loop of one expert, top to bottom.

prepare (model, band, schedule, caches) → resume? → steps (accumulate, clip, step, EMA, log, checkpoint,
validate) → export the expert pipeline + run.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from expertune.data.batches import (
    Bucket,
    MicroBatch,
    batches_per_epoch,
    caption_for,
    collate,
    drop_captions,
    epoch_batches,
    micro_batches,
)
from expertune.errors import ConfigError, TrainingInterrupted
from expertune.experts import ExpertBand, band_from_settings, expert_summary
from expertune.io_utils import atomic_write_json
from expertune.models.lora import add_lora_adapters, save_lora_expert
from expertune.models.sdxl import load_components, make_scheduler, save_expert_pipeline
from expertune.schedule import NoiseSchedule
from expertune.train import device as device_settings
from expertune.train.checkpoint import (
    DataPosition,
    TrainingState,
    check_resume_compatible,
    checkpoints_dir,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_document,
    remove_partial_checkpoints,
    resolve_checkpoint,
    resume_requested,
    save_checkpoint,
)
from expertune.train.ema import ExponentialMovingAverage
from expertune.train.loss import TrainingBatch, denoising_loss, draw_randomness
from expertune.train.metrics import MetricsLog, truncate_metrics
from expertune.train.optim import build_lr_scheduler, build_optimizer
from expertune.train.outputs import check_output_dir, run_identity
from expertune.train.runtime import agreed, has_accelerator, library_versions, peak_memory_gib, tracker_config
from expertune.train.prepare import PreparedData, prepare_data
from expertune.train.signals import StopRequests
from expertune.train.trackers import init_trackers, log_with
from expertune.train.weighting import WeightTable, resolve_weighting
from expertune.train.strategy import (
    accelerator_options,
    check_supported,
    configure_deepspeed,
    engine_requested,
    strategy_for,
    whole_model_loading,
)

log = logging.getLogger("expertune.train")

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


def total_optimizer_steps(config: Any, buckets: int | Sequence[Bucket], world_size: int) -> int:
    t = config.train
    if t.max_train_steps:
        return int(t.max_train_steps)
    epochs = t.num_train_epochs or 1
    micro = batches_per_epoch(buckets, t.train_batch_size, world_size) * epochs
    return max(1, -(-micro // t.gradient_accumulation_steps))


def load_batch(prepared: PreparedData, micro: MicroBatch) -> TrainingBatch:
    latents, time_ids, embeds = [], [], []
    for index in micro.indices:
        item = prepared.items[index]
        latent, ids = prepared.latent_cache.load(item.record, item.spec)
        latents.append(latent)
        time_ids.append(ids)
        embeds.append(prepared.embed_cache.load(caption_for(item, micro.epoch)))
    return collate(latents, time_ids, embeds)


def _checkpoint_due(config: Any, step: int, epochs_completed_now: bool, epoch: int) -> bool:
    t = config.train
    by_step = bool(t.checkpoint_step_interval) and step % t.checkpoint_step_interval == 0
    by_epoch = bool(t.checkpoint_epoch_interval) and epochs_completed_now and (epoch + 1) % t.checkpoint_epoch_interval == 0
    return by_step or by_epoch


def train(config: Any) -> RunResult:
    """Train one expert as `config` describes and save it as a diffusers pipeline with expert.json."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from expertune.validate.plan import build_plan
    from expertune.validate.samples import Validator

    config.require_for_training()
    started = time.monotonic()
    t, v = config.train, config.validation
    output_dir = Path(t.output_dir)
    resuming = resume_requested(output_dir, t.resume_from_checkpoint)  # `latest` with none yet: a fresh run
    logging_dir = Path(config.logging.logging_dir) if config.logging.logging_dir else output_dir / "logs"

    # accelerate keeps process-wide state; a second run in one process (the demo, a notebook) may use other
    # precision settings. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    check_supported(config, engine_requested() or "ddp")
    accelerator = Accelerator(
        # DDP on CPUs: cpu=True makes several processes a gloo group (MULTI_CPU); DeepSpeed and FSDP: see strategy
        **accelerator_options(has_accelerator()),
        mixed_precision=config.model.mixed_precision,
        log_with=log_with(config, logging_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    check_output_dir(output_dir, overwrite=t.overwrite_output_dir, resuming=resuming,
                     main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # no process looks at output_dir while the main one clears it
    checkpoint_path = resolve_checkpoint(output_dir, t.resume_from_checkpoint) if resuming else None
    torch.manual_seed(t.seed)
    with whole_model_loading(accelerator):  # ZeRO-3 must not partition the frozen models nor the UNet yet
        components = load_components(
            config.model.pretrained_model_name_or_path, revision=config.model.revision, variant=config.model.variant
        )
    schedule = noise_schedule_for(config, components.scheduler_config)
    for warning in schedule.warnings():
        log.warning(warning)
    band = expert_band_for(config, schedule.num_train_timesteps)
    log.info("expert band %s of %d timesteps, prediction_type=%s, zero-terminal SNR=%s",
             band, schedule.num_train_timesteps, schedule.prediction_type, schedule.rescale_betas_zero_snr)
    weights = WeightTable.build(schedule.alphas_cumprod, resolve_weighting(t.loss_weighting, t.snr_gamma),
                                schedule.prediction_type, t.snr_gamma)
    weight_summary = weights.band_summary(band.lo, band.hi)
    log.info("loss weighting %s: mean weight %.4g over the band (min %.4g, max %.4g)", weights.weighting,
             weight_summary["mean"], weight_summary["min"], weight_summary["max"])
    if (starved := weights.starvation(band.lo, band.hi)) is not None:
        log.warning(starved)

    with whole_model_loading(accelerator):
        plan = build_plan(config, band, schedule, output_dir, device=accelerator.device)  # refuses a bad peer early
    for frozen in (components.vae, components.text_encoder_1, components.text_encoder_2):
        frozen.to(accelerator.device)
    with accelerator.main_process_first():  # rank 0 fills the caches; the others then find every entry
        prepared = prepare_data(config, components, extra_prompts=plan.prompts_to_cache)
    components.release_text_encoders()
    identity = run_identity(prepared, components.source)

    unet = components.unet
    unet.train()
    m = config.model
    if m.model_type == "lora":
        count = add_lora_adapters(unet, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
        log.info("training LoRA adapters (rank %d): %.2fM parameters", m.lora_rank, count / 1e6)
    else:
        unet.requires_grad_(True)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    bf16_weights = device_settings.hold_weights_in_bf16(unet, t.optimizer)
    device_settings.apply_tf32(m.allow_tf32, accelerator.device)
    device_settings.warn_if_bf16_is_slow(m.mixed_precision, accelerator.device)
    device_settings.compile_unet(unet, m.dynamo_backend, accelerator.device)
    total_steps = total_optimizer_steps(config, prepared.buckets, accelerator.num_processes)
    optimizer = build_optimizer(unet.parameters(), t)
    lr_scheduler = build_lr_scheduler(optimizer, t, total_steps, processes=accelerator.num_processes)
    if deepspeed:
        configure_deepspeed(accelerator, config)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    strategy = strategy_for(accelerator, unet, optimizer, t.gradient_accumulation_steps)
    trained = strategy.unet
    log.info("engine: %s (%d processes)", accelerator.distributed_type.value, accelerator.num_processes)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    ema = None
    if t.use_ema:
        ema_device = "cpu" if t.ema_device == "cpu" else accelerator.device
        ema = ExponentialMovingAverage(trainable, t.ema_decay, ema_device)

    # One generator, the same on every rank: each rank draws the whole global batch's timesteps, noise and
    # caption dropout and takes its own slice (see StepRandomness), so results do not depend on world size.
    generator = torch.Generator().manual_seed(t.seed)
    state = TrainingState(step=0, data=DataPosition(0, 0, 0), unet=trained, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, generator=generator, epoch_order=[], ema=ema,
                          strategy=strategy)
    config_snapshot = config.to_dict()
    if checkpoint_path is not None:
        document = read_checkpoint_document(checkpoint_path)
        check_resume_compatible(document, config_snapshot, identity, t.allow_config_change, checkpoint_path)
        load_checkpoint(checkpoint_path, state)
        if state.epoch_order and state.epoch_order != _epoch_layout(config, prepared, accelerator, state.data.epoch):
            raise ConfigError(f"the data order stored in {checkpoint_path} does not match the datasets any more")
        log.info("resumed from %s at step %d (epoch %d)", checkpoint_path, state.step, state.data.epoch)
    if accelerator.is_main_process:
        truncate_metrics(output_dir / "metrics.jsonl", state.step)
        remove_partial_checkpoints(output_dir)

    if accelerator.is_main_process and config.logging.report_to != "none":
        init_trackers(accelerator, config, tracker_config(config))
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    validator = Validator(config, plan, components, schedule, band, prepared, accelerator, output_dir, metrics)
    if bf16_weights:  # the pipelines feed float32 latents: autocast casts them for the bfloat16 UNet
        validator.run = _under_autocast(validator.run, accelerator)
    if v.validation_on_startup:
        _validate(validator, strategy, accelerator, state.step)
    stream = _resumed_stream(config, prepared, accelerator, state.data.micro_batches_consumed)

    accumulation = t.gradient_accumulation_steps
    stratified = config.band.timestep_sampling == "stratified"
    checkpointing = bool(t.checkpoint_step_interval or t.checkpoint_epoch_interval)
    progress = tqdm(total=total_steps, initial=state.step, desc=f"training {band}",
                    disable=not accelerator.is_local_main_process)
    first_step_at: float | None = None
    last_record: dict[str, Any] = {}
    last_saved = state.step if checkpoint_path is not None else None
    layout_epoch = state.data.epoch if state.epoch_order else None
    with StopRequests() as stop:
        for step in range(state.step + 1, total_steps + 1):
            step_started = time.monotonic()
            group = [next(stream) for _ in range(accumulation)]
            samples = sum(len(m.indices) for m in group)
            step_loss = torch.zeros((), dtype=torch.float64)
            step_timesteps = []
            for position, micro in enumerate(group):
                batch = load_batch(prepared, micro).to(accelerator.device, strategy.input_dtype())
                draws = draw_randomness(band, generator, micro.global_size, tuple(batch.latents.shape[1:]),
                                        config.data.caption_dropout_probability, stratified)
                mine = draws.for_rank(accelerator.process_index, accelerator.num_processes)
                batch = drop_captions(batch, mine.keep_caption)
                last = position == len(group) - 1
                with strategy.micro_step(accelerator, unet, last), accelerator.autocast():
                    out = denoising_loss(unet, batch, schedule, mine, weights)
                    weight = batch.size / samples
                    accelerator.backward(out.loss * (weight * strategy.loss_scale))
                step_loss += out.loss.detach().double().cpu() * weight
                step_timesteps.append(draws.timesteps)  # every sample of every rank
            grad_norm = None
            if t.max_grad_norm and t.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
            optimizer.step()  # under DeepSpeed these three are no-ops: its engine stepped in backward()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None and step % t.ema_update_interval == 0:
                ema.update(trainable)

            tail = group[-1]
            consumed = state.data.micro_batches_consumed + len(group)
            epoch_done = tail.epoch_end
            state.step = step
            state.data = DataPosition(consumed, tail.epoch, tail.position)
            if tail.epoch != layout_epoch:  # recomputed once per epoch, not per step
                state.epoch_order = _epoch_layout(config, prepared, accelerator, tail.epoch)
                layout_epoch = tail.epoch

            timesteps = torch.cat(step_timesteps)
            if accelerator.num_processes > 1:
                step_loss = accelerator.reduce(step_loss.float().to(accelerator.device), "mean").cpu()
            lr = lr_scheduler.get_last_lr()[0]
            record = {
                "step": step,
                "epoch": tail.epoch,
                "loss": float(step_loss),
                "lr": float(lr),
                "timestep_min": int(timesteps.min()),
                "timestep_max": int(timesteps.max()),
                "samples": sum(m.global_size for m in group),
                "seconds": round(time.monotonic() - step_started, 4),
            }
            if grad_norm is not None and float(grad_norm) >= 0:  # DeepSpeed reports -1 before its first norm
                record["grad_norm"] = float(grad_norm)
            if first_step_at is None:
                first_step_at = time.monotonic() - started
            if accelerator.is_main_process:
                metrics.write(record)
                accelerator.log({f"train/{k}": record[k] for k in ("loss", "lr", "grad_norm") if k in record},
                                step=step)
            last_record = record
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", step=step)

            stopping = agreed(accelerator, stop.requested)
            if _checkpoint_due(config, step, epoch_done, tail.epoch) or stopping:
                snapshot = strategy.snapshot()  # every rank: gathering sharded state is a collective
                if accelerator.is_main_process:
                    save_checkpoint(output_dir, state, config_snapshot, identity, snapshot)
                    prune_checkpoints(output_dir, t.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                last_saved = step
            if stopping:
                progress.close()
                metrics.close()
                accelerator.end_training()
                raise TrainingInterrupted(
                    f"interrupted at step {step}/{total_steps}; checkpoint saved in {checkpoints_dir(output_dir)}. "
                    "Continue with --resume_from_checkpoint latest", stop.received or 15)
            if v.validation_step_interval and step % v.validation_step_interval == 0 and step < total_steps:
                _validate(validator, strategy, accelerator, step)
    progress.close()

    accelerator.wait_for_everyone()
    if checkpointing and last_saved != total_steps:
        snapshot = strategy.snapshot()
        if accelerator.is_main_process:
            save_checkpoint(output_dir, state, config_snapshot, identity, snapshot)
            prune_checkpoints(output_dir, t.checkpoints_total_limit)
        accelerator.wait_for_everyone()
    trained.eval()
    if ema is not None and t.export_ema:
        ema.copy_to(trainable)
        log.info("exporting the EMA weights (%d updates) as the pipeline's UNet", ema.updates)
    final = strategy.whole_unet(accelerator.device)  # sharded engines: gathered into one copy on the main process
    validation_files = validator.run(final, total_steps) if final is not None else []
    metrics.close()
    lora = config.model.model_type == "lora"
    pipeline_dir = output_dir / ("lora" if lora else "pipeline")
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        scheduler = make_scheduler(components.scheduler_class, schedule.scheduler_config(components.scheduler_config))
        expert = expert_summary(band, schedule.describe())
        expert["base_model"] = components.source
        expert["model_type"] = config.model.model_type
        expert["weights"] = "ema" if (ema is not None and t.export_ema) else "trained"
        if lora:
            save_lora_expert(trained, scheduler, expert, pipeline_dir)
        else:
            with whole_model_loading(accelerator):  # the export reloads the text encoders
                save_expert_pipeline(components, final, scheduler, expert, pipeline_dir)
        summary = {
            "format_version": 1,
            "expert": expert,
            "steps": total_steps,
            "resumed_from": str(checkpoint_path) if checkpoint_path else None,
            "epochs_started": state.data.epoch + 1,
            "samples_per_epoch": len(prepared.items),
            "final": last_record,
            "cache": prepared.cache_stats,
            "skipped_images": prepared.skipped,
            "buckets": prepared.bucket_table,
            "validation_images": [str(p) for p in validation_files],
            "seconds": {
                "total": round(time.monotonic() - started, 3),
                "to_first_step": round(first_step_at or 0.0, 3),
            },
            "peak_memory_gib": peak_memory_gib(accelerator.device),
            "loss_weight": weight_summary,
            "device": device_settings.describe(config),
            "config": config_snapshot,
            "versions": library_versions(),
        }
        atomic_write_json(output_dir / "run.json", summary)
    accelerator.end_training()
    log.info("done: %d steps, expert %s saved to %s", total_steps, band, pipeline_dir)
    return RunResult(output_dir, pipeline_dir, band, total_steps, summary)


def _under_autocast(run: Any, accelerator: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return run(*args, **kwargs)
    return wrapped


def _validate(validator: Any, strategy: Any, accelerator: Any, step: int) -> None:
    """Validation on the main process; a sharded UNet is first gathered into one copy (all ranks take part)."""
    if validator.v.validation_disable:
        return
    if not strategy.sharded:
        validator.run(strategy.unet, step)
        return
    whole = strategy.whole_unet(accelerator.device)
    if whole is not None:
        validator.run(whole, step)
        del whole
    accelerator.wait_for_everyone()


def _epoch_layout(config: Any, prepared: PreparedData, accelerator: Any, epoch: int) -> list[int]:
    """The epoch's order of items (its global batches, flattened): what a checkpoint records and checks."""
    global_size = config.train.train_batch_size * accelerator.num_processes
    batches = epoch_batches(prepared.buckets, global_size, config.train.seed, epoch,
                            world_size=accelerator.num_processes)
    return [index for batch in batches for index in batch]


def _resumed_stream(config: Any, prepared: PreparedData, accelerator: Any, consumed: int) -> Iterator[MicroBatch]:
    """The run's micro-batch stream, advanced past the `consumed` micro-batches of earlier steps."""
    stream = micro_batches(prepared.buckets, config.train.train_batch_size, config.train.seed,
                           rank=accelerator.process_index, world_size=accelerator.num_processes)
    for _ in range(consumed):
        next(stream)
    return stream


