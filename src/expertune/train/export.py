"""The end of a run: the trained expert saved as a pipeline (or LoRA) directory, and run.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from expertune.expert_format import ExpertDescription
from expertune.io_utils import atomic_write_json
from expertune.models.lora import save_lora_expert
from expertune.models.sdxl import make_scheduler, save_expert_pipeline
from expertune.train import device as device_settings
from expertune.train.runtime import library_versions, peak_memory_gib
from expertune.train.setup import ExpertRun, Run
from expertune.train.strategy import whole_model_loading

log = logging.getLogger(__name__)


def pipeline_dir_for(run: Run) -> Path:
    return run.output_dir / ("lora" if run.config.model.model_type == "lora" else "pipeline")


def final_weights(run: Run, expert: ExpertRun) -> Any | None:
    """The weights to export (EMA ones with --export_ema), whole on the main process; None on the others."""
    expert.trained.eval()
    if expert.ema is not None and run.config.train.export_ema:
        expert.ema.copy_to(expert.trainable)
        log.info("exporting the EMA weights (%d updates) as the pipeline's UNet", expert.ema.updates)
    return expert.strategy.whole_unet(run.accelerator.device)  # sharded engines: gathered on the main process


def export_expert(run: Run, expert: ExpertRun, final: Any | None) -> ExpertDescription:
    """Save the expert (main process) and return its expert.json description."""
    config, components, schedule = run.config, run.components, run.schedule
    description = ExpertDescription(
        expert.band, schedule.describe(), model_type=config.model.model_type, base_model=components.source,
        weights="ema" if (expert.ema is not None and config.train.export_ema) else "trained")
    if not run.is_main:
        return description
    scheduler = make_scheduler(components.scheduler_class, schedule.scheduler_config(components.scheduler_config))
    destination = pipeline_dir_for(run)
    if config.model.model_type == "lora":
        save_lora_expert(expert.trained, scheduler, description, destination)
    else:
        with whole_model_loading(run.accelerator):  # the export reloads the text encoders
            save_expert_pipeline(components, final, scheduler, description, destination)
    return description


def expert_weight_summary(run: Run) -> dict[str, Any] | None:
    """The expert's mean, min and max loss weight over its band (run.json `loss_weight`)."""
    weights, band = run.expert.weights, run.expert.band
    return None if weights is None else weights.band_summary(band.lo, band.hi)


def write_summary(run: Run, expert: ExpertRun, description: ExpertDescription,
                  validation_files: list[Path]) -> dict[str, Any]:
    """run.json (main process): what was trained, from what, how fast, with which cache and data."""
    if not run.is_main:
        return {}
    prepared, state = run.prepared, expert.state
    summary = {
        "format_version": 1,
        "expert": description.to_json(),
        "steps": run.total_steps,
        "resumed_from": str(run.checkpoint_path) if run.checkpoint_path else None,
        "epochs_started": state.data.epoch + 1,
        "samples_per_epoch": len(prepared.items),
        "final": expert.last_record,
        "cache": prepared.cache_stats,
        "skipped_images": prepared.skipped,
        "buckets": prepared.bucket_table,
        "validation_images": [str(p) for p in validation_files],
        "seconds": {
            "total": round(time.monotonic() - run.started, 3),
            "to_first_step": round(run.first_step_at or 0.0, 3),
        },
        "peak_memory_gib": peak_memory_gib(run.accelerator.device),
        "loss_weight": expert_weight_summary(run),
        "device": device_settings.describe(run.config),
        "config": run.config_snapshot,
        "versions": library_versions(),
    }
    atomic_write_json(run.output_dir / "run.json", summary)
    return summary
