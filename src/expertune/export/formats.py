"""The export formats of an exported tree (an expert's or a mixture's folder) beside its diffusers folders.

    <root>/pipeline/ (or lora/), or expert-<k>/pipeline/ + mixture.json     the diffusers expert(s)
    <root>/single_file/<name>.safetensors                                   each full expert, original SDXL layout
    <root>/single_file/<name>_lora.safetensors                              each LoRA expert, kohya layout
    <root>/single_file/<name>.yaml                                          A1111's config of a v-prediction expert
    <root>/single_file/workflow_api.json                                    the ComfyUI chain of every expert

`single_file` is written from the diffusers folders already on disk, so the training end, an interrupted run and
`expertune export` make the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from expertune.errors import ModelError
from expertune.expert_format import (  # noqa: F401  (FORMATS, parse_formats: the export_format option's words)
    EXPERT_FILE,
    FORMATS,
    MIXTURE_FILE,
    ExpertDescription,
    MixtureDescription,
    parse_formats,
)
from expertune.io_utils import atomic_write_json, staged_directory

log = logging.getLogger(__name__)

SINGLE_FILE_DIR = "single_file"
WORKFLOW_FILE = "workflow_api.json"


def expert_relative_dir(model_type: str, index: int, mixture: bool) -> Path:
    """Where an expert is saved inside its tree: `pipeline/` (or `lora/`), under `expert-<k>/` in a mixture."""
    name = "lora" if model_type == "lora" else "pipeline"
    return Path(f"expert-{index}") / name if mixture else Path(name)


@dataclass(frozen=True)
class ExportedExpert:
    """An expert folder of an exported tree and what its expert.json says."""

    path: Path
    description: ExpertDescription


def exported_experts(root: Path) -> list[ExportedExpert]:
    """The experts of a tree in chain order: its mixture.json's, its pipeline/ or lora/, or the folder itself."""
    if (root / MIXTURE_FILE).is_file():
        paths = MixtureDescription.read(root).expert_dirs(root)
    else:
        candidates = [root / "pipeline", root / "lora", root]
        paths = [next((c for c in candidates if (c / EXPERT_FILE).is_file()), root / "pipeline")]
    return [ExportedExpert(p, ExpertDescription.read(p)) for p in paths]


def _unet_layers_per_block(expert: ExportedExpert) -> int:
    """The base UNet's layers_per_block of a LoRA expert (read from its base model's config, offline too)."""
    from diffusers import UNet2DConditionModel

    base = expert.description.base_model
    if not base:
        raise ModelError(f"LoRA expert {expert.path} names no base_model in its expert.json: the kohya layout "
                         "needs the base UNet's layout")
    try:
        config = UNet2DConditionModel.load_config(base, subfolder="unet")
    except (OSError, ValueError) as error:
        raise ModelError(f"LoRA expert {expert.path}: could not read the UNet config of its base model {base!r} "
                         f"({error}); make the base model available (a local folder or the HF cache)") from None
    return int(config["layers_per_block"])


def _load_pipeline(path: Path, dtype: object = None):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from expertune.models.sdxl import REFINER_LAYOUT, layout_kind_of, read_pipeline_index

    refiner = layout_kind_of(read_pipeline_index(str(path))) == REFINER_LAYOUT
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    return cls.from_pretrained(str(path), use_safetensors=True, dtype=dtype), refiner


def cast_experts(root: str | Path, precision: str) -> None:
    """Rewrite the diffusers expert(s) of a tree (a staged export) with their weights in `precision`: each full
    pipeline saved again from a copy loaded in that dtype, each LoRA file cast tensor by tensor."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from expertune.models.lora import LORA_WEIGHTS
    from expertune.models.single_file import PRECISIONS

    dtype = PRECISIONS[precision]
    for expert in exported_experts(Path(root)):
        if expert.description.model_type == "lora":
            file = expert.path / LORA_WEIGHTS
            with safe_open(str(file), "pt") as handle:
                metadata = handle.metadata()
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
            save_file(weights, str(file), metadata=metadata)
            continue
        pipeline, _ = _load_pipeline(expert.path, dtype)
        fresh = expert.path.with_name(f".{expert.path.name}.{precision}")
        pipeline.save_pretrained(str(fresh), safe_serialization=True)
        del pipeline
        shutil.copy2(expert.path / EXPERT_FILE, fresh / EXPERT_FILE)
        shutil.rmtree(expert.path)
        fresh.rename(expert.path)


def write_single_files(root: str | Path, *, precision: str = "fp32", name: str | None = None) -> list[Path]:
    """`root/single_file/`: each expert of the tree as one ComfyUI / A1111 file, and the chain's ComfyUI workflow.
    Replaces an earlier `single_file/` of the same tree in one rename; returns the files written."""
    from expertune.export.comfyui import WorkflowExpert, chain_workflow
    from expertune.models.kohya_lora import save_kohya_lora
    from expertune.models.lora import LORA_WEIGHTS
    from expertune.models.single_file import Parameterisation, save_single_file

    tree = Path(root)
    experts = exported_experts(tree)
    stem = name or tree.name
    entries: list[WorkflowExpert] = []
    with staged_directory(tree / SINGLE_FILE_DIR) as staged:
        for index, expert in enumerate(experts):
            band = expert.description.band
            label = stem if len(experts) == 1 else f"{stem}-expert-{index}"
            label += f"-t{band.lo}-{band.hi}"
            parameterisation = Parameterisation.from_scheduler_config(expert.description.parameterisation,
                                                                      (band.lo, band.hi))
            prediction, zsnr = parameterisation.prediction_type, parameterisation.zero_terminal_snr
            if expert.description.model_type == "lora":
                target = staged / f"{label}_lora.safetensors"
                save_kohya_lora(expert.path / LORA_WEIGHTS, target, _unet_layers_per_block(expert),
                                precision=precision, metadata=parameterisation.metadata(refiner=False, title=label))
                base = Path(str(expert.description.base_model)).name
                entries.append(WorkflowExpert(f"{base}.safetensors", band, lora=target.name,
                                              prediction_type=prediction, zero_terminal_snr=zsnr))
            else:
                pipeline, refiner = _load_pipeline(expert.path)
                target = save_single_file(pipeline, staged / f"{label}.safetensors", parameterisation,
                                          precision=precision, title=label)
                entries.append(WorkflowExpert(target.name, band, refiner=refiner,
                                              prediction_type=prediction, zero_terminal_snr=zsnr))
            log.info("wrote %s", target.name)
        atomic_write_json(staged / WORKFLOW_FILE, chain_workflow(entries))
        written = sorted(p.name for p in staged.iterdir())
    files = [tree / SINGLE_FILE_DIR / n for n in written]
    log.info("single-file export: %s", ", ".join(str(f) for f in files))
    return files


def read_workflow(root: Path) -> dict[str, dict[str, object]]:
    return json.loads((root / SINGLE_FILE_DIR / WORKFLOW_FILE).read_text(encoding="utf-8"))
