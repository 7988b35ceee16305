"""The end of a run: the trained expert saved as a pipeline (or LoRA) directory, and run.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from expertune.expert_format import ExpertDescription, MixtureDescription, MixtureMember
from expertune.export.formats import expert_relative_dir, parse_formats, write_single_files
from expertune.io_utils import atomic_write_json
from expertune.models.lora import save_lora_expert
from expertune.models.sdxl import make_scheduler, save_expert_pipeline
from expertune.train import device as device_settings
from expertune.train.knobs import knobs_summary
from expertune.train.runtime import library_versions, peak_memory_gib
from expertune.train.setup import ExpertRun, Run
from expertune.train.signals import pause_point
from expertune.train.strategy import whole_model_loading

log = logging.getLogger(__name__)


def expert_dir_for(run: Run, expert: ExpertRun) -> Path:
    """Where the expert is saved: `pipeline/` (or `lora/`), under `expert-<k>/` in a mixture."""
    return run.output_dir / expert_relative_dir(run.config.model.model_type, expert.index, run.is_mixture)


def result_dir(run: Run) -> Path:
    """What the run made: the one expert's directory, or the mixture's (the output directory, mixture.json)."""
    return run.output_dir if run.is_mixture else expert_dir_for(run, run.expert)


def final_weights(run: Run, expert: ExpertRun) -> Any | None:
    """The weights to export (EMA ones with --export_ema), whole on the main process; None on the others."""
    expert.trained.eval()
    if expert.ema is not None and run.config.train.export_ema:
        expert.ema.copy_to(expert.trainable)
        log.info("exporting the EMA weights (%d updates) as the pipeline's UNet", expert.ema.updates)
    return expert.strategy.whole_unet(run.accelerator.device)  # sharded engines: gathered on the main process


def export_experts(run: Run, finals: list[Any | None]) -> list[ExpertDescription]:
    """Save every expert of the job (main process) and, for a mixture, mixture.json; their descriptions."""
    descriptions = []
    for expert, final in zip(run.experts, finals):
        descriptions.append(export_expert(run, expert, final))
        pause_point("export")  # tests: a kill between two experts' exports
    if run.is_mixture and run.is_main:
        members = tuple(MixtureMember(str(expert_dir_for(run, e).relative_to(run.output_dir)), run.own_band(e),
                                      run.config.model.model_type, run.widened_band(e)) for e in run.experts)
        blend = run.plan.handoff_blend if run.plan is not None else 0
        MixtureDescription(members, run.schedule.describe(), blend).write(run.output_dir)
    if run.is_main and "single_file" in parse_formats(run.config.train.export_format):
        write_single_files(run.output_dir, precision=run.config.train.export_precision, name=run.output_dir.name)
    return descriptions


def export_on_interrupt(run: Run) -> None:
    """After a stop request's checkpoint (--export_on_interrupt): the experts as they are, in --export_format.
    A failure here is logged and leaves the checkpoint, which `expertune export` can still turn into experts."""
    if not run.config.train.export_on_interrupt:
        return
    from expertune.errors import ExpertuneError

    try:
        export_experts(run, [final_weights(run, expert) for expert in run.experts])
        log.info("interrupted run exported to %s", result_dir(run))
    except (ExpertuneError, OSError) as error:
        log.error("could not export the interrupted run (%s); the checkpoint is kept: run `expertune export %s`",
                  error, run.output_dir)


def export_expert(run: Run, expert: ExpertRun, final: Any | None) -> ExpertDescription:
    """Save the expert (main process) and return its expert.json description."""
    config, components, schedule = run.config, expert.components, run.schedule
    description = ExpertDescription(
        run.own_band(expert), schedule.describe(), model_type=config.model.model_type, base_model=components.source,
        base_revision=config.model.revision, base_variant=config.model.variant,
        weights="ema" if (expert.ema is not None and config.train.export_ema) else "trained",
        training_band=run.widened_band(expert), training=knobs_summary(run.config_of(expert)))  # issue 23
    if not run.is_main:
        return description
    scheduler = make_scheduler(components.scheduler_class, schedule.scheduler_config(components.scheduler_config))
    destination = expert_dir_for(run, expert)
    if config.model.model_type == "lora":
        save_lora_expert(expert.trained, scheduler, description, destination)
    else:
        with whole_model_loading(run.accelerator):  # the export reloads the text encoders
            save_expert_pipeline(components, final, scheduler, description, destination)
    return description


def expert_weight_summary(expert: ExpertRun) -> dict[str, Any] | None:
    """The expert's mean, min and max loss weight over its band (run.json `loss_weight`)."""
    weights, band = expert.weights, expert.band
    return None if weights is None else weights.band_summary(band.lo, band.hi)


def write_summary(run: Run, descriptions: list[ExpertDescription], validation_files: list[Path]) -> dict[str, Any]:
    """run.json (main process): what was trained, from what, how fast, with which cache and data. A mixture's
    lists every expert under `experts` (with its own steps, final metrics and loss weighting)."""
    if not run.is_main:
        return {}
    prepared, first = run.prepared, run.experts[0]
    summary: dict[str, Any] = {
        "format_version": 1,
        "expert": descriptions[0].to_json(),
        "steps": run.total_steps,
        "resumed_from": str(run.checkpoint_path) if run.checkpoint_path else None,
        "epochs_started": max(e.state.data.epoch for e in run.experts) + 1,
        "samples_per_epoch": len(prepared.items),
        "final": first.last_record,
        "cache": prepared.cache_stats,
        "skipped_images": prepared.skipped,
        "buckets": prepared.bucket_table,
        "validation_images": [str(p) for p in validation_files],
        "seconds": {
            "total": round(time.monotonic() - run.started, 3),
            "to_first_step": round(run.first_step_at or 0.0, 3),
        },
        "peak_memory_gib": peak_memory_gib(run.accelerator.device),
        "loss_weight": expert_weight_summary(first),
        "device": device_settings.describe(run.config),
        "config": run.config_snapshot,
        "versions": library_versions(),
    }
    if run.is_mixture:
        del summary["expert"], summary["final"], summary["loss_weight"]
        summary["mixture"] = {
            "schedule": run.config.mixture.mixture_schedule,
            "shared_steps": run.shared.steps if run.shared is not None else 0,  # --mixture_shared_steps
            "experts": [{"expert": d.to_json(), "path": str(expert_dir_for(run, e).relative_to(run.output_dir)),
                         "steps": e.state.step, "final": e.last_record, "loss_weight": expert_weight_summary(e),
                         "learning_rate": e.settings.learning_rate,
                         "model": e.components.source, "cache": e.prepared.cache_stats}
                        for e, d in zip(run.experts, descriptions)],
        }
    atomic_write_json(run.output_dir / "run.json", summary)
    return summary
