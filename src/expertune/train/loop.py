"""The training loop of one expert, top to bottom.

setup (model, band, schedule, caches, optimizer, resume) → steps (accumulate, clip, step, EMA, log,
checkpoint, validate) → export the expert → final validation → run.json.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertune.config import Config
from expertune.data.batches import MicroBatch, drop_captions
from expertune.errors import NonFiniteError, TrainingInterrupted
from expertune.experts import ExpertBand
from expertune.objective.loss import TrainingBatch, denoising_loss, draw_randomness
from expertune.prepare import PreparedData
from expertune.run_folder import checkpoints_dir, disk_full_is_a_stop
from expertune.train.branch import branch
from expertune.train.checkpoint import DataPosition, check_finite
from expertune.train.checkpointer import Checkpointer
from expertune.train.export import export_experts, export_on_interrupt, final_weights, result_dir, write_summary
from expertune.train.knobs import distribution_for, loss_type_for, perturbation_for
from expertune.train.offload import ActiveExpert
from expertune.train.periodic import PeriodicValidation
from expertune.train.prefetch import BatchFeed, load_batch  # noqa: F401  (load_batch: re-exported)
from expertune.train.runtime import agreed
from expertune.train.setup import (  # noqa: F401  (re-exported: the loop's helpers, as before)
    ExpertRun,
    Run,
    expert_band_for,
    noise_schedule_for,
    setup_run,
    total_optimizer_steps,
)
from expertune.train.signals import StopRequests, injected_nonfinite
from expertune.train.timing import StepMeter, known_peak_tflops

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    pipeline_dir: Path  # the expert's directory; a mixture's: the output directory, which holds mixture.json
    band: ExpertBand  # the expert's band; a mixture's: the whole schedule
    steps: int
    summary: dict[str, Any]


def train(config: Config) -> RunResult:
    """Train the expert (or every expert of the mixture) `config` describes and save it as diffusers pipelines
    with expert.json (and mixture.json)."""
    run = setup_run(config)  # holds the output directory's lock until the run ends
    try:
        with disk_full_is_a_stop("the run's files (metrics.jsonl, run.json, logs) in", run.output_dir):
            return _train(run)
    finally:
        run.lock.release()


def _train(run: Run) -> RunResult:
    from tqdm.auto import tqdm

    config = run.config
    checkpointer = Checkpointer(run)
    validation = PeriodicValidation(config, run.accelerator, run.total_steps)
    with disk_full_is_a_stop("validation images in", run.output_dir / "validation"):
        validation.at_startup(run)
    progress = tqdm(total=run.total_steps, initial=run.step, desc=f"training {describe_bands(run)}",
                    disable=not run.accelerator.is_local_main_process)
    meter = step_meter(run)
    with StopRequests(run.output_dir) as stop, progress, ActiveExpert(run) as active, \
            BatchFeed(run, config.train.prefetch_batches) as feed:
        while run.step < run.total_steps:
            if run.shared is not None and run.shared.due(run.step):
                branch(run)  # --mixture_shared_steps: the experts branch from the trunk (train/branch.py)
            expert = active.take(run.next_expert())
            tail = train_step(run, expert, meter, feed)
            updated = bool(expert.last_record)
            if updated:
                log_step(run, expert.last_record, progress)
            stopping = agreed(run.accelerator, stop.requested)
            if updated or stopping:
                checkpointer.maybe_save(tail.epoch_end and updated, tail.epoch, stopping=stopping)
            if stopping:
                stop_run(run, stop.received)
            if updated:
                with disk_full_is_a_stop("validation images in", run.output_dir / "validation"):
                    validation.maybe_run(run)
    checkpointer.save_final()
    finals = [final_weights(run, expert) for expert in run.experts]
    for expert, final in zip(run.experts, finals):
        if final is not None:
            check_finite(dict(final.state_dict()), expert.state, f"expert {expert.index}", run.step)
    with disk_full_is_a_stop("the exported expert in", result_dir(run)):
        descriptions = export_experts(run, finals)  # first, so a failing validation cannot lose an expert
    with disk_full_is_a_stop("validation images in", run.output_dir / "validation"):
        files = validation.final(run, finals)
    run.metrics.close()
    summary = write_summary(run, descriptions, files)
    run.accelerator.end_training()
    log.info("done: %d steps, %s saved to %s", run.total_steps, describe_bands(run), result_dir(run))
    band = run.experts[0].band if len(run.experts) == 1 else ExpertBand.full(run.schedule.num_train_timesteps)
    return RunResult(run.output_dir, result_dir(run), band, run.total_steps, summary)


def describe_bands(run: Run) -> str:
    return str(run.experts[0].band) if len(run.experts) == 1 else f"{len(run.experts)} experts"


def step_meter(run: Run) -> StepMeter:
    """The run's step timing: breakdown interval, peak for MFU."""
    t, m = run.config.train, run.config.model
    device = run.accelerator.device
    peak = t.peak_tflops or known_peak_tflops(device, m.mixed_precision, m.allow_tf32)
    return StepMeter(device, t.timing_breakdown_interval, peak)


def unet_config(accelerator: Any, expert: ExpertRun) -> tuple[dict[str, Any] | None, type | None]:
    """The trained UNet's diffusers config and class (for counting its FLOPs), through accelerate's and peft's
    wrappers."""
    model = accelerator.unwrap_model(expert.unet)
    model = getattr(model, "base_model", model)
    model = getattr(model, "model", model)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    config = getattr(model, "config", None)
    return (dict(config), type(model)) if config is not None else (None, None)


def train_step(run: Run, expert: ExpertRun, meter: StepMeter | None = None, feed: BatchFeed | None = None
               ) -> MicroBatch:
    """One optimizer step of `expert`: accumulate its micro-batches, clip, step, EMA; advance its state and
    leave the step's metrics in `expert.last_record`. Returns the step's last micro-batch.

    A non-finite loss or gradient norm on any rank skips the update on every rank (the batches are consumed, the
    step is not counted, `expert.last_record` is left empty); `max_nonfinite_steps` in a row stop the run."""
    accelerator, t = run.accelerator, run.config.train
    meter = meter or StepMeter(accelerator.device, count_flops=False)
    feed = feed or BatchFeed(run, prefetch=False)
    clock = meter.clock(run.step + 1)
    step = expert.state.step + 1  # the expert's own step; the job's is run.step + 1
    pairs = feed.take(expert, t.gradient_accumulation_steps)
    group = [micro for micro, _ in pairs]
    samples = sum(len(m.indices) for m in group)
    stratified = run.config.band.timestep_sampling == "stratified"
    step_loss = torch.zeros((), dtype=torch.float64)
    step_timesteps = []
    knobs = run.config_of(expert)  # issue 23: its loss type, timestep distribution, perturbation and masks
    for position, (micro, host_batch) in enumerate(pairs):
        batch = feed.to_device(host_batch, expert.strategy.input_dtype())
        draws = draw_randomness(expert.training_band, expert.state.generator, micro.global_size,
                                tuple(batch.latents.shape[1:]), run.config.data.caption_dropout_probability,
                                stratified, t.noise_offset if t.offset_noise else 0.0, t.noise_offset_probability,
                                distribution_for(knobs), perturbation_for(knobs, expert.state.step),
                                knobs.train.masked_loss_probability
                                if batch.masks is not None else None)
        mine = draws.for_rank(accelerator.process_index, accelerator.num_processes)
        batch = drop_captions(batch, mine.keep_caption)
        clock.mark("data")
        if meter.count_flops:
            config, unet_class = unet_config(accelerator, expert)
            meter.count(config, tuple(batch.latents.shape[1:]), batch.prompt_embeds.shape[1],
                        batch.pooled_embeds.shape[-1], unet_class, clock)
        with expert.strategy.micro_step(accelerator, expert.unet, position == len(group) - 1), \
                accelerator.autocast():
            out = denoising_loss(expert.unet, batch, run.schedule, mine, weights=expert.weights,
                                 loss_type=loss_type_for(knobs),
                                 use_masks=mine.use_masks)
            weight = batch.size / samples
            accelerator.backward(out.loss * (weight * expert.strategy.loss_scale))
        clock.mark("compute")
        step_loss += out.loss.detach().double().cpu() * weight
        step_timesteps.append(draws.timesteps)  # every sample of every rank
    grad_norm = None
    if t.max_grad_norm and t.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(expert.unet.parameters(), t.max_grad_norm)
    if injected_nonfinite(accelerator.process_index, run.step + 1):
        step_loss = torch.tensor(float("nan"), dtype=torch.float64)
    if agreed(accelerator, not _finite_update(accelerator, expert, step_loss, grad_norm)):
        return _skip(run, expert, step, group)
    run.nonfinite_streak = 0
    expert.optimizer.step()  # under DeepSpeed these three are no-ops: its engine stepped in backward()
    expert.lr_scheduler.step()
    expert.optimizer.zero_grad(set_to_none=True)
    if expert.ema is not None and step % t.ema_update_interval == 0:
        expert.ema.update(expert.trainable)
    clock.mark("optimizer")
    seconds = clock.finish()  # after the device has finished the step: clipping, optimizer and EMA included
    tail = _advance(run, expert, step, group)
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss.float().to(accelerator.device), "mean").cpu()
    timesteps = torch.cat(step_timesteps)
    record: dict[str, Any] = {"step": run.step}
    if run.is_mixture:
        record.update(expert=expert.index, expert_step=step)
        if run.shared is not None and not run.shared.branched:
            record["shared"] = True  # the trunk of a shared start trains this step
    record |= {
        "epoch": tail.epoch,
        "loss": float(step_loss),
        "lr": float(expert.lr_scheduler.get_last_lr()[0]),
        "timestep_min": int(timesteps.min()),
        "timestep_max": int(timesteps.max()),
        "samples": sum(m.global_size for m in group),
    }
    record |= meter.figures(clock, seconds, record["samples"], samples)
    if grad_norm is not None and float(grad_norm) >= 0:  # DeepSpeed reports -1 before its first norm
        record["grad_norm"] = float(grad_norm)
    expert.last_record = record
    if run.first_step_at is None:
        run.first_step_at = time.monotonic() - run.started
    return tail


def _finite_update(accelerator: object, expert: ExpertRun, loss: torch.Tensor, grad_norm: object) -> bool:
    """Whether this rank's loss and gradients are finite. With fp16 loss scaling an infinite gradient is the
    GradScaler's business (it skips the step and lowers the scale), so only the loss is checked then."""
    if not math.isfinite(float(loss)):
        return False
    if getattr(accelerator, "scaler", None) is not None:
        return True
    if grad_norm is not None:
        return math.isfinite(float(grad_norm))  # type: ignore[arg-type]
    return all(bool(torch.isfinite(p.grad).all()) for p in expert.trainable if p.grad is not None)


def _skip(run: Run, expert: ExpertRun, step: int, group: list[MicroBatch]) -> MicroBatch:
    """Drop the gradients of a non-finite update; the batches count as consumed, the step does not."""
    expert.optimizer.zero_grad(set_to_none=True)
    if expert.strategy.layout == "deepspeed-full":  # its engine stepped inside backward(): nothing left to skip
        raise NonFiniteError(f"a non-finite loss or gradient norm at step {run.step + 1} under DeepSpeed, whose "
                             "engine steps inside backward: the update cannot be skipped, so the run stops without "
                             "a checkpoint. Resume from the last one with a lower --learning_rate")
    prepared = expert.prepared
    items = [str(prepared.items[i].record.remote_key or prepared.items[i].record.path)
             for micro in group for i in micro.indices]
    run.nonfinite_streak += 1
    limit = run.config.train.max_nonfinite_steps
    log.warning("step %d%s: non-finite loss or gradient norm; update skipped (%d in a row, limit %d); items: %s",
                run.step + 1, f" (expert {expert.index})" if run.is_mixture else "", run.nonfinite_streak, limit,
                ", ".join(items))
    if run.is_main:
        run.metrics.write({"step": run.step + 1, "kind": "skipped", "expert_step": step, "items": items})
    if run.nonfinite_streak >= limit:
        raise NonFiniteError(
            f"{run.nonfinite_streak} updates in a row had a non-finite loss or gradient norm (max_nonfinite_steps="
            f"{limit}), the last at step {run.step + 1} with items {', '.join(items)}: the run stops; no checkpoint "
            "was written from them. Check those images and their cache entries, lower --learning_rate, then resume "
            "with --resume_from_checkpoint latest")
    expert.last_record = {}
    return _advance(run, expert, step - 1, group)


def _advance(run: Run, expert: ExpertRun, step: int, group: list[MicroBatch]) -> MicroBatch:
    """The expert's state after `step`: its step, data position and (once per epoch) the epoch's order."""
    state, tail = expert.state, group[-1]
    state.step = step
    state.data = DataPosition(state.data.micro_batches_consumed + len(group), tail.epoch, tail.position)
    if tail.epoch != expert.layout_epoch:  # recomputed once per epoch, not per step
        state.epoch_order = run.epoch_layout(tail.epoch)
        expert.layout_epoch = tail.epoch
    return tail


def log_step(run: Run, record: dict[str, Any], progress: Any) -> None:
    """The step's metrics to metrics.jsonl and the trackers (main process), and the progress bar."""
    if run.is_main:
        run.metrics.write(record)
        prefix = f"train/expert_{record['expert']}/" if "expert" in record else "train/"
        run.accelerator.log({f"{prefix}{k}": record[k] for k in ("loss", "lr", "grad_norm") if k in record},
                            step=record["step"])
    progress.update(1)
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", step=record["step"])


def stop_run(run: Run, signal_number: int | None) -> None:
    """After the stop request's checkpoint: export (--export_on_interrupt), close the logs, raise TrainingInterrupted."""
    export_on_interrupt(run)
    run.metrics.close()
    run.accelerator.end_training()
    raise TrainingInterrupted(
        f"interrupted at step {run.step}/{run.total_steps}; checkpoint saved in "
        f"{checkpoints_dir(run.output_dir)}. Continue with --resume_from_checkpoint latest", signal_number or 15)
