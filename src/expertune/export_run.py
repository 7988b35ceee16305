"""`expertune export`: a checkpoint (or a run's output directory) as the expert(s) a finished run would have saved.

`export_run(source, out, formats, precision)` reads:

- a `checkpoint-<N>` folder: the config snapshot in its state.json says the model, the band(s), the
  parameterisation and LoRA settings; the weights (or the EMA weights with --export_ema) come from its files;
- a run's output directory: its exported experts when the run finished (run.json at least as new as its newest
  checkpoint), else its newest complete checkpoint;
- an exported expert or mixture folder (expert.json / mixture.json): re-exported, e.g. to add `single_file`.

It writes `out` (default `<output_dir>/exports/<checkpoint-N | final>`) as one staged folder renamed into place,
with `export.json` naming what it came from. An existing `out` is replaced only when it is such an export;
any other non-empty folder is refused, so no user file is overwritten.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertune.errors import ConfigError, ModelError
from expertune.expert_format import EXPERT_FILE, MIXTURE_FILE, MixtureDescription, MixtureMember
from expertune.export.formats import cast_experts, exported_experts, expert_relative_dir, write_single_files
from expertune.io_utils import atomic_write_json, staged_directory

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class ExportSource:
    """What `export_run` reads: a checkpoint folder, or an exported tree (`tree`), and the run folder it belongs to."""

    kind: str  # "checkpoint" | "tree"
    path: Path
    run_dir: Path
    label: str  # checkpoint-<N> | final | the tree's name


def resolve_source(source: Path) -> ExportSource:
    """The checkpoint or exported tree `source` names (see the module doc); ConfigError naming what was found."""
    from expertune.train.checkpoint import NAME, is_complete, list_checkpoints, other_format

    source = source.expanduser()
    if not source.is_dir():
        raise ConfigError(f"export: {source} is not a folder; pass a checkpoint-N folder, a training output "
                          "directory, or an exported expert / mixture folder")
    if NAME.match(source.name) and (source / "state.json").is_file():
        if not is_complete(source):
            raise ConfigError(f"export: {source} is not a complete checkpoint "
                              f"({other_format(source) or 'files missing or unreadable'})")
        return ExportSource("checkpoint", source, source.parent.parent, source.name)
    if (source / EXPERT_FILE).is_file():  # an expert folder itself: its exports go beside it
        return ExportSource("tree", source, source.parent, source.name)
    checkpoints = list_checkpoints(source)
    finished = _finished_steps(source)
    newest_step = int(NAME.match(checkpoints[-1].name).group(1)) if checkpoints else -1  # type: ignore[union-attr]
    has_experts = any((source / n).is_dir() for n in ("pipeline", "lora")) or (source / MIXTURE_FILE).is_file()
    if has_experts and finished is not None and finished >= newest_step:
        return ExportSource("tree", source, source, "final")
    if checkpoints:
        return ExportSource("checkpoint", checkpoints[-1], source, checkpoints[-1].name)
    if has_experts:
        return ExportSource("tree", source, source, "final")
    raise ConfigError(f"export: {source} holds no checkpoint (checkpoints/checkpoint-N), no exported expert "
                      "(pipeline/, lora/, mixture.json) and no expert.json; pass a run's output directory or one "
                      "of its checkpoints")


def _finished_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_destination(out: Path) -> None:
    """Refuse a destination that holds anything but an earlier export (never overwrite the user's files)."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file()):
        raise ConfigError(f"export: {out} already exists and is not an expertune export (no {EXPORT_FILE}); "
                          "choose another --out, or remove it yourself")


def export_run(source: Path, out: Path | None = None, formats: tuple[str, ...] = ("diffusers",),
               precision: str = "fp32", *, revision: str | None = None, variant: str | None = None) -> list[Path]:
    """Export `source` (a checkpoint, a run's output directory, or an exported tree) to `out` in `formats`
    (`diffusers`, `single_file`); returns the top-level entries written under `out`."""
    from expertune.models.single_file import PRECISIONS

    if precision not in PRECISIONS:
        raise ConfigError(f"export: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not formats:
        raise ConfigError("export: no format asked for; use --export_format diffusers,single_file")
    resolved = resolve_source(Path(source))
    target = Path(out) if out is not None else resolved.run_dir / "exports" / resolved.label
    whole = resolved.kind == "checkpoint" or (resolved.path / EXPERT_FILE).is_file()  # read as a whole folder
    if whole and (target.resolve() == resolved.path.resolve() or resolved.path.resolve() in target.resolve().parents):
        raise ConfigError(f"export: --out {target} lies inside {resolved.path}, which it exports; choose another folder")
    check_destination(target)
    with staged_directory(target) as staged:
        if resolved.kind == "checkpoint":
            experts_from_checkpoint(resolved.path, staged, revision=revision, variant=variant)
        else:
            copy_tree(resolved.path, staged)
        if "single_file" in formats:
            write_single_files(staged, precision=precision, name=resolved.run_dir.name)
        if "diffusers" in formats and precision != "fp32":
            cast_experts(staged, precision)
        if "diffusers" not in formats:
            for entry in staged.iterdir():
                if entry.name.startswith("expert-") or entry.name in ("pipeline", "lora"):
                    shutil.rmtree(entry)
            (staged / MIXTURE_FILE).unlink(missing_ok=True)
        atomic_write_json(staged / EXPORT_FILE, {"format_version": 1, "source": str(resolved.path),
                                                 "kind": resolved.kind, "formats": list(formats),
                                                 "precision": precision})
        written = sorted(p.name for p in staged.iterdir())
    log.info("exported %s to %s (%s)", resolved.path, target, ", ".join(formats))
    return [target / name for name in written]


def copy_tree(tree: Path, staged: Path) -> None:
    """The expert folders (and mixture.json) of an exported tree, copied into `staged` in the same layout."""
    experts = exported_experts(tree)
    mixture = (tree / MIXTURE_FILE).is_file()
    for index, expert in enumerate(experts):
        relative = expert_relative_dir(expert.description.model_type, index, mixture) if expert.path != tree \
            else expert_relative_dir(expert.description.model_type, 0, False)
        shutil.copytree(expert.path, staged / relative, ignore=shutil.ignore_patterns(".*"))
    if mixture:
        shutil.copy2(tree / MIXTURE_FILE, staged / MIXTURE_FILE)


def experts_from_checkpoint(checkpoint: Path, staged: Path, *, revision: str | None = None,
                            variant: str | None = None) -> list[Path]:
    """Rebuild each expert of the checkpoint (its base model, band, parameterisation, trained or EMA weights)
    and save it into `staged` as training would; returns the expert folders."""
    from safetensors.torch import load_file

    from expertune.config.migrations import migrate_snapshot
    from expertune.config.sources import config_from_mapping
    from expertune.expert_format import ExpertDescription
    from expertune.models.adapters import adapter_spec
    from expertune.models.lora import add_adapters, save_lora_expert
    from expertune.models.sdxl import SDXLComponents, load_components, make_scheduler, save_expert_pipeline
    from expertune.train.checkpoint import expert_folder, read_checkpoint_document
    from expertune.train.knobs import knobs_summary
    from expertune.train.setup import expert_bands_for, noise_schedule_for

    document = read_checkpoint_document(checkpoint)
    snapshot = migrate_snapshot(document["config"], document.get("config_version"), f"checkpoint {checkpoint}")
    config = config_from_mapping(snapshot, f"checkpoint {checkpoint}")
    m, t = config.model, config.train
    source = m.pretrained_model_name_or_path
    if not source:
        raise ModelError(f"checkpoint {checkpoint}: its config names no pretrained_model_name_or_path")
    revision, variant = revision or m.revision, variant or m.variant
    log.info("exporting %s: loading %s", checkpoint, source)
    def load(name: str) -> SDXLComponents:
        return load_components(name, revision=revision, variant=variant, single_file_config=m.single_file_config,
                               cache_dir=config.resolved_cache_dir())

    components = load(source)
    schedule = noise_schedule_for(config, components.scheduler_config)
    bands = expert_bands_for(config, schedule)
    plan = config.mixture_plan
    widened: list[Any] = [None] * len(bands)  # --mixture_overlap: each expert's training_timestep_range
    if plan is not None and plan.overlap is not None:
        widened = list(plan.training_bands(schedule.alphas_cumprod))
    count = document.get("experts")
    if (count or 1) != len(bands):
        raise ModelError(f"checkpoint {checkpoint} holds {count or 1} expert(s) but its config plans {len(bands)}")
    mixture = count is not None
    sources = plan.model_sources(source, source) if mixture and plan is not None else [source]
    loaded: dict[str, Any] = {source: components}
    remaining = Counter(sources)
    folders = []
    for index, (model_source, band) in enumerate(zip(sources, bands)):
        if model_source not in loaded:
            loaded[model_source] = load(model_source)
        model = loaded[model_source]
        remaining[model_source] -= 1  # one UNet per expert: a copy while a later expert still needs the pristine one
        unet = copy.deepcopy(model.unet) if remaining[model_source] else model.unet
        folder = checkpoint / expert_folder(index) if mixture else checkpoint
        if m.model_type == "lora":
            add_adapters(unet, adapter_spec(m))  # issue 23: the run's adapter kind
        else:
            unet.requires_grad_(True)
        unet.load_state_dict(load_file(str(folder / "unet.safetensors")), strict=m.model_type != "lora")
        use_ema = t.export_ema and (folder / "ema.safetensors").is_file()
        if use_ema:
            shadow = load_file(str(folder / "ema.safetensors"))
            trainable = [p for p in unet.parameters() if p.requires_grad]
            if len(shadow) != len(trainable):
                raise ModelError(f"{folder / 'ema.safetensors'} holds {len(shadow)} tensors, the model trains "
                                 f"{len(trainable)}")
            for position, parameter in enumerate(trainable):
                parameter.data.copy_(shadow[str(position)])
        unet.eval()
        description = ExpertDescription(band, schedule.describe(), model_type=m.model_type, base_model=model.source,
                                        base_revision=revision, base_variant=variant,
                                        weights="ema" if use_ema else "trained", training_band=widened[index],
                                        training=knobs_summary(config))  # issue 23 (per-expert: the run's)
        scheduler = make_scheduler(model.scheduler_class, schedule.scheduler_config(model.scheduler_config))
        destination = staged / expert_relative_dir(m.model_type, index, mixture)
        if m.model_type == "lora":
            save_lora_expert(unet, scheduler, description, destination)
        else:
            save_expert_pipeline(model, unet, scheduler, description, destination)
        folders.append(destination)
    if mixture:
        members = tuple(MixtureMember(str(expert_relative_dir(m.model_type, k, True)), band, m.model_type, widened[k])
                        for k, band in enumerate(bands))
        MixtureDescription(members, schedule.describe(), plan.handoff_blend if plan is not None else 0).write(staged)
    return folders


def expert_folders(source: str, scratch: Path) -> list[Path]:
    """The expert folders `source` stands for, as `generate` takes it: an expert or mixture folder, a run's output
    directory, a checkpoint (exported into `scratch` first: its config names the model, band and weights), or a hub
    id of an exported expert found in the local Hugging Face cache."""
    from expertune.infer.sources import local_model

    path = Path(source).expanduser()
    folder = path if path.is_dir() else local_model(source)
    resolved = resolve_source(folder)
    if resolved.kind == "checkpoint":
        target = scratch / f"{len(list(scratch.iterdir())) if scratch.is_dir() else 0}-{resolved.label}"
        log.info("exporting %s to read it", resolved.path)
        export_run(resolved.path, target)
        folder = target
    return [expert.path for expert in exported_experts(folder)]
