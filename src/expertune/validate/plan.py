"""What a run will validate with, settled before any expensive work, so a bad input fails in seconds.

- prompts: `--validation_prompt` (named `prompt`) and the entries of `--validation_prompt_library`;
- explicit input images for a low-noise expert (`--validation_input`, a file or a directory);
- the peer expert (`--validation_peer_expert`), refused unless it chains with this run's expert
  (same parameterisation, bands that tile the schedule) — the guard `expertune generate` applies.

Every prompt is known here, so the text-embedding cache can hold them all before the text encoders
are released (`prompts_to_cache`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertune.data.records import IMAGE_EXTENSIONS, _captions_from_textfile, _image_paths
from expertune.errors import ConfigError
from expertune.expert_format import expert_summary
from expertune.experts import ExpertBand
from expertune.infer.chain import ExpertInfo, check_chain, read_expert
from expertune.schedule import NoiseSchedule, inference_timesteps

if TYPE_CHECKING:
    from expertune.config.schema import Config

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PROMPT_NAME = "prompt"  # the name of --validation_prompt among the validation prompts


@dataclass(frozen=True)
class ValidationPrompt:
    name: str  # used in file names, TensorBoard tags and metric keys
    text: str


@dataclass(frozen=True)
class ValidationInput:
    path: Path
    name: str
    prompt: str  # its caption file's first line, else --validation_prompt, else ""


@dataclass
class ValidationPlan:
    prompts: list[ValidationPrompt] = field(default_factory=list)  # empty: captions of dataset images
    inputs: list[ValidationInput] = field(default_factory=list)
    negative_prompt: str = ""
    peer: ExpertInfo | None = None
    chain: list[ExpertInfo] = field(default_factory=list)  # this run and its peer, in band order
    clip: Any = None  # a ClipScorer with --evaluation_type clip

    @property
    def prompts_to_cache(self) -> list[str]:
        texts = [p.text for p in self.prompts] + [i.prompt for i in self.inputs]
        if self.negative_prompt:
            texts.append(self.negative_prompt)
        return sorted(set(texts))


def load_prompt_library(path: str | Path) -> list[ValidationPrompt]:
    """A `.json` object `{name: prompt}`, or any other text file with one prompt per line.

    Lines are named `line_NN` after their line number; blank lines and lines starting with `#` are skipped.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError(f"validation_prompt_library {source}: cannot read it ({error.strerror or error})") from None
    prompts: list[ValidationPrompt] = []
    if source.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"validation_prompt_library {source} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"validation_prompt_library {source} must hold a JSON object {{\"name\": \"prompt\"}}, "
                              f"not a {type(data).__name__}")
        for name, prompt in data.items():
            if not NAME_PATTERN.match(name):
                raise ConfigError(f"validation_prompt_library {source}: name {name!r} must be letters, digits, "
                                  "'_', '-' or '.', starting with a letter or digit")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"validation_prompt_library {source}: prompt {name!r} must be a non-empty "
                                  f"string, got {prompt!r}")
            prompts.append(ValidationPrompt(name, prompt.strip()))
    else:
        width = max(2, len(str(len(text.splitlines()))))
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(ValidationPrompt(f"line_{number:0{width}d}", line.strip()))
    if not prompts:
        raise ConfigError(f"validation_prompt_library {source} holds no prompt")
    return prompts


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.") or "image"


def find_validation_inputs(path: str | Path, fallback_prompt: str | None) -> list[ValidationInput]:
    """The images of `--validation_input` (a file, or a directory searched recursively), sorted."""
    source = Path(path).expanduser()
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ConfigError(f"validation_input {source} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files = [source]
    elif source.is_dir():
        files = _image_paths(source)
        if not files:
            raise ConfigError(f"validation_input {source} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    else:
        raise ConfigError(f"validation_input {source} does not exist; give an image file or a directory of images")
    inputs, used = [], set()
    for file in files:
        name = _safe_name(file.stem)
        while name in used:
            name += "_"
        used.add(name)
        captions, _missing = _captions_from_textfile(file)
        inputs.append(ValidationInput(file, name, captions[0] if captions else (fallback_prompt or "")))
    return inputs


def prompt_texts(config: Config) -> list[str]:
    """Every text validation will look up in the embedding cache; needs no model, so `expertune cache`
    caches exactly what a later `train` validates with."""
    v = config.validation
    if v.validation_disable:
        return sorted({v.validation_negative_prompt} - {""})
    texts = [v.validation_prompt, v.validation_negative_prompt]
    if v.validation_prompt_library:
        texts += [p.text for p in load_prompt_library(v.validation_prompt_library)]
    if v.validation_input:
        texts += [i.prompt for i in find_validation_inputs(v.validation_input, v.validation_prompt)]
    return sorted({t for t in texts if t})


def steps_in_band(band: ExpertBand, schedule: NoiseSchedule, num_inference_steps: int) -> list[int]:
    """The validation sampler's timesteps (inference spacing, steps offset 0) that fall inside the band."""
    steps = inference_timesteps(schedule.num_train_timesteps, num_inference_steps, schedule.inference_timestep_spacing)
    return [t for t in steps if band.lo <= t <= band.hi]


def check_steps_reach_band(band: ExpertBand, schedule: NoiseSchedule, num_inference_steps: int) -> None:
    """Refuse, before training, validation that would run no denoising step of this expert."""
    if steps_in_band(band, schedule, num_inference_steps):
        return
    enough = next((n for n in range(num_inference_steps + 1, schedule.num_train_timesteps + 1)
                   if steps_in_band(band, schedule, n)), None)
    hint = (f"use --validation_num_inference_steps={enough} or more" if enough
            else "widen the band")
    raise ConfigError(
        f"validation cannot run this expert: none of the {num_inference_steps} "
        f"{schedule.inference_timestep_spacing} inference timesteps falls in its band {band}; {hint}, or set "
        "--validation_disable")


def this_run_expert(band: ExpertBand, schedule: NoiseSchedule, output_dir: Path) -> ExpertInfo:
    """The expert being trained, described as its expert.json will describe it."""
    return ExpertInfo(output_dir, band, expert_summary(band, schedule.describe()), label=f"this run ({output_dir})")


def build_plan(config: Config, band: ExpertBand, schedule: NoiseSchedule, output_dir: Path,
               device: Any = "cpu") -> ValidationPlan:
    """Read every validation input, check the peer, load the CLIP model; raises ConfigError/ModelError
    naming the input."""
    v = config.validation
    plan = ValidationPlan(negative_prompt=v.validation_negative_prompt)
    if v.validation_disable:
        return plan
    check_steps_reach_band(band, schedule, v.validation_num_inference_steps)
    if v.validation_prompt:
        plan.prompts.append(ValidationPrompt(PROMPT_NAME, v.validation_prompt))
    if v.validation_prompt_library:
        library = load_prompt_library(v.validation_prompt_library)
        clash = [p.name for p in library if p.name == PROMPT_NAME and v.validation_prompt]
        if clash:
            raise ConfigError(f"validation_prompt_library {v.validation_prompt_library} names a prompt "
                              f"{PROMPT_NAME!r}, the name of --validation_prompt; rename it")
        plan.prompts.extend(library)
    if v.validation_input:
        if band.holds_start:
            raise ConfigError(
                f"validation_input={v.validation_input!r} is for experts that continue from a noised image; "
                f"this expert's band {band} starts from pure noise (t = {band.num_train_timesteps - 1}): remove "
                "it, or name the other stage with --validation_peer_expert")
        plan.inputs = find_validation_inputs(v.validation_input, v.validation_prompt)
    if v.validation_peer_expert:
        plan.peer = read_expert(v.validation_peer_expert)
        plan.chain = check_chain([this_run_expert(band, schedule, output_dir), plan.peer])
    if v.evaluation_type == "clip":
        from expertune.validate.metrics import ClipScorer

        plan.clip = ClipScorer(v.pretrained_evaluation_model_name_or_path, device)
    return plan
