"""What `generate` is given, read from disk: a model that is a local folder, a single-file checkpoint or a hub id
from the local Hugging Face cache (downloaded into it once when online, as training's start does); the untouched base model as a one-expert chain
(`--base`, the baseline); and a prompts file (one prompt a line, or SimpleTuner's prompt library JSON)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand
from expertune.infer.chain import ExpertInfo

log = logging.getLogger(__name__)


def local_model(source: str, *, single_file_config: str | None = None, revision: str | None = None) -> Path:
    """A local diffusers folder for `source`: the folder itself, a single-file checkpoint's converted folder, or a
    hub id's snapshot: from the local Hugging Face cache, else (unless HF_HUB_OFFLINE) downloaded into it once
    (configs, tokenizers and safetensors weights only) after the same checks and messages as training's start
    (models/source.py); ModelError naming the fix otherwise."""
    from expertune.models.sdxl import model_folder

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return Path(model_folder(str(path), single_file_config=single_file_config))
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelError(f"model {source!r} is neither a local folder or file nor a Hugging Face hub id (owner/name)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no such repository): fetched below, or said where it was looked
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"hub model {source!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
                             f" and HF_HUB_OFFLINE is set: download it once (`hf download {source}`), unset "
                             "HF_HUB_OFFLINE, or pass a local folder") from None
    from expertune.models.source import check_model_source

    check_model_source(source, revision)  # no network, gated, no such repository or revision: one clear line
    log.info("downloading %s%s into the Hugging Face cache (%s)", source, f"@{revision}" if revision else "",
             constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(source, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer*/*"]))
    except Exception as error:  # noqa: BLE001 - a download that broke off: say which and how to retry
        raise ModelError(f"could not download hub model {source!r}: {error}; run it again (downloads resume) or "
                         f"fetch it with `hf download {source}`") from None


def base_expert(source: str, *, single_file_config: str | None = None) -> ExpertInfo:
    """The untouched model as a chain of one expert over the whole schedule, sampled with its own scheduler."""
    from expertune.models.sdxl import read_scheduler_config

    folder = local_model(source, single_file_config=single_file_config)
    config = read_scheduler_config(folder)
    n = int(config.get("num_train_timesteps", 1000))
    description = {"timestep_range": [0, n - 1], "num_train_timesteps": n, "model_type": "full",
                   "prediction_type": config.get("prediction_type", "epsilon"),
                   "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
                   "timestep_spacing": config.get("timestep_spacing", "leading")}
    return ExpertInfo(folder, ExpertBand.full(n), description, label=f"base model {source}")


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """{name: prompt} from a prompts file: SimpleTuner's prompt library (a JSON object name → prompt), or text with
    one prompt a line (blank lines and lines starting with # skipped; named prompt_000, prompt_001, ...)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--prompts {file}: cannot read it ({error})") from None
    if file.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--prompts {file}: not valid JSON ({error}); write {{\"name\": \"prompt\", ...}}") from None
        if not isinstance(document, dict) or not all(isinstance(v, str) and v.strip() for v in document.values()):
            raise ConfigError(f"--prompts {file}: a prompt library is a JSON object of names to non-empty prompts")
        prompts = {_safe_name(str(k)): v for k, v in document.items()}
    else:
        lines = [line.strip() for line in text.splitlines()]
        prompts = {f"prompt_{i:03d}": line for i, line in enumerate(l for l in lines if l and not l.startswith("#"))}
    if not prompts:
        raise ConfigError(f"--prompts {file} holds no prompt")
    return prompts


def _safe_name(name: str) -> str:
    """A prompt name as a file name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "prompt"
