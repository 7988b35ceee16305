"""Community single-file checkpoints in: an SDXL / SSD-1B / SDXL-refiner `.safetensors` in the original layout as
a model expertune trains from (`--pretrained_model_name_or_path some.safetensors`, `--expert_models`).

diffusers reads the file (`from_single_file`, offline, `config=` a diffusers folder). That folder is assembled from
the configs shipped in `models/configs/<family>/` (model_index.json and each component's config, written from
`models/layouts.py` and the diffusers / transformers class defaults: `write_shipped_configs`) plus the CLIP
tokenizers. The tokenizers' BPE vocabulary is not shipped with expertune: it comes from `--single_file_config DIR`
(any diffusers folder of the family: its configs and tokenizers are used as they are), else from the official
repository's copy in the local Hugging Face cache, else the load is refused naming both fixes.

The file is converted once into a diffusers folder under `<cache_dir>/single_file/<name>-<digest>/` (its own
dtype; the digest covers the file's path, size and modification time), and that folder is the model from then on:
every loader, the export's reload of the text encoders and a LoRA expert's `base_model` read it like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from expertune.errors import ModelError
from expertune.io_utils import atomic_write_json, staged_directory

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
FAMILIES = {"sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0", "ssd-1b": "segmind/SSD-1B",
            "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}
TOKENIZERS = ("tokenizer", "tokenizer_2")


def is_single_file(source: str) -> bool:
    return source.endswith(".safetensors") and Path(source).expanduser().is_file()


def family_of(keys: set[str]) -> str:
    """sdxl-refiner (bigG alone, as embedder 0), ssd-1b (a mid block without a transformer) or sdxl-base; a file
    of another layout is refused."""
    if "conditioner.embedders.0.model.text_projection" in keys:
        return "sdxl-refiner"
    if not any(k.startswith("model.diffusion_model.") for k in keys) or \
            "conditioner.embedders.1.model.positional_embedding" not in keys:
        raise ModelError("the checkpoint is not in the original SDXL layout (no model.diffusion_model. UNet or no "
                         "OpenCLIP bigG under conditioner.embedders.1.model.): expertune trains SDXL-family models")
    mid_attention = any(k.startswith("model.diffusion_model.middle_block.1.") for k in keys)
    return "sdxl-base" if mid_attention else "ssd-1b"


def _digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _cached_tokenizers(family: str) -> Path | None:
    """The official repository's tokenizer folders: from the local Hugging Face cache, else (unless HF_HUB_OFFLINE)
    fetched once into it — the tokenizer files only, a few MB, as diffusers' own single-file loader would — or None."""
    from huggingface_hub import constants, snapshot_download

    patterns = [f"{t}/*" for t in TOKENIZERS]
    for local_only in (True, False):
        if not local_only and constants.HF_HUB_OFFLINE:
            return None
        try:
            if not local_only:
                log.info("fetching the %s tokenizers (tokenizer/, tokenizer_2/ only) from %s", family, FAMILIES[family])
            folder = Path(snapshot_download(FAMILIES[family], local_files_only=local_only, allow_patterns=patterns))
        except Exception:  # noqa: BLE001 - any miss (not cached, no network, no such repo) means "not available"
            continue
        if (folder / "tokenizer_2").is_dir():
            return folder
    return None


def config_folder(family: str, single_file_config: str | None, scratch: Path) -> Path:
    """The diffusers folder `from_single_file` reads configs and tokenizers from (see the module doc)."""
    if single_file_config:
        given = Path(single_file_config).expanduser()
        if not (given / "model_index.json").is_file():
            raise ModelError(f"single_file_config {given} is not a diffusers model folder (no model_index.json)")
        return given
    tokenizers = _cached_tokenizers(family)
    if tokenizers is None:
        raise ModelError(
            f"the checkpoint has the {family} layout, whose CLIP tokenizers (BPE vocabulary) expertune does not ship "
            f"and {FAMILIES[family]}'s tokenizers are neither in the local Hugging Face cache nor could be fetched; pass --single_file_config DIR, a "
            f"diffusers folder of the same family holding tokenizer/ and tokenizer_2/ (e.g. a download of "
            f"{FAMILIES[family]}), or download that repository once so its cached copy is found")
    shutil.copytree(CONFIGS / family, scratch, dirs_exist_ok=True)
    for name in TOKENIZERS:
        if (tokenizers / name).is_dir():
            shutil.copytree(tokenizers / name, scratch / name, dirs_exist_ok=True)
    return scratch


def materialise(path: str, *, cache_dir: Path, single_file_config: str | None = None) -> Path:
    """The diffusers folder of the single-file checkpoint `path`, converted once into `cache_dir/single_file/`."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    target = cache_dir / "single_file" / f"{file.stem}-{_digest(file)}"
    if (target / "model_index.json").is_file():
        return target
    with safe_open(str(file), "pt") as handle:
        keys = set(handle.keys())
        sample = handle.get_tensor(next(k for k in sorted(keys) if k.startswith("model.diffusion_model.")))
    family = family_of(keys)
    log.info("converting single-file checkpoint %s (%s layout) to a diffusers folder in %s", file, family, target)
    with tempfile.TemporaryDirectory() as scratch, staged_directory(target) as staged:
        pipeline = _read(file, family, config_folder(family, single_file_config, Path(scratch) / "config"),
                         sample.dtype)
        pipeline.save_pretrained(str(staged), safe_serialization=True)
        atomic_write_json(staged / "single_file.json", {"source": str(file), "family": family})
    return target


def _read(file: Path, family: str, config: Path, dtype: Any) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl-refiner" else StableDiffusionXLPipeline
    try:
        return cls.from_single_file(str(file), config=str(config), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelError(f"could not read single-file checkpoint {file} with the configs of {config}: {error}; "
                         "if it is a fine-tune of another layout, pass --single_file_config with a diffusers folder "
                         "of that model") from None


def write_shipped_configs(root: Path = CONFIGS) -> list[Path]:
    """Write `root/<family>/` for every family from the layouts and the class defaults (no weights, no download):
    model_index.json, unet/vae/text encoder configs and the scheduler config. Returns the folders written."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from expertune.models import layouts
    from expertune.models.tiny import tiny_scheduler_config

    written = []
    for family, layout in (("sdxl-base", layouts.sdxl_layout()), ("ssd-1b", layouts.ssd1b_layout()),
                           ("sdxl-refiner", layouts.sdxl_refiner_layout())):
        folder = root / family
        with torch.device("meta"):
            UNet2DConditionModel(**layout.unet).save_config(str(folder / "unet"))
            AutoencoderKL(**layout.vae).save_config(str(folder / "vae"))
        encoders = [("text_encoder", layout.text_encoder_1), ("text_encoder_2", layout.text_encoder_2)]
        for name, shape in encoders:
            if shape is None:
                continue
            CLIPTextConfig(vocab_size=shape.vocab_size, hidden_size=shape.width, intermediate_size=shape.intermediate,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=77,
                           hidden_act=shape.hidden_act, projection_dim=shape.projection_dim).save_pretrained(
                str(folder / name))
        EulerDiscreteScheduler(**tiny_scheduler_config()).save_config(str(folder / "scheduler"))
        refiner = layout.is_refiner
        index: dict[str, Any] = {
            "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": not refiner,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
            "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
        if refiner:
            index["requires_aesthetics_score"] = True
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(folder)
    return written


def source_digest(folder: str | os.PathLike) -> str | None:
    """The single-file checkpoint a converted folder came from (its single_file.json), or None."""
    path = Path(folder) / "single_file.json"
    return json.loads(path.read_text(encoding="utf-8"))["source"] if path.is_file() else None
