"""`expertune init`: a starter configuration for SSD-1B or SDXL, two stages or a mixture, sized for a GPU.

It writes, into one folder (SimpleTuner's `config/` by default), never over an existing file:
- the settings: SimpleTuner's config.json shape (`stage1/config.json` and `stage2/config.json`, picked with
  `ENV=stage1` as SimpleTuner does, or `config.json` for a mixture) with a README.md explaining each choice
  (JSON has no comments), or expertune's TOML with the explanations as comments;
- `multidatabackend.json`, the dataloader JSON (one local image folder, its caches), and
  `user_prompt_library.json`, SimpleTuner's `{"shortname": "prompt"}` validation prompts.

Sizing uses `models.memory.estimate` (computed from the layout, not measured): bf16 autocast always; the first
of AdamW without gradient checkpointing, AdamW with it, adamw_bf16, Adafactor that fits with the largest
micro-batch of 8, 4, 2, 1 in 85 % of the memory less 1.5 GiB for the CUDA context; gradient accumulation up to
the recipe's batch of 8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from expertune.errors import ConfigError
from expertune.io_utils import atomic_write_bytes

MODELS = {"ssd-1b": "segmind/SSD-1B", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
LAYOUTS = ("two-stage", "mixture")
FORMATS = ("json", "toml")
RECIPE_BATCH = 8  # the recipe's TRAIN_BATCH_SIZE
GIB = 1024**3


@dataclass(frozen=True)
class Sizing:
    optimizer: str
    gradient_checkpointing: bool
    train_batch_size: int
    gradient_accumulation_steps: int
    mixture_offload_inactive: bool
    estimate_gib: float
    budget_gib: float

    def reasons(self) -> list[str]:
        return [
            f"mixed_precision bf16: autocast in bfloat16, trained weights kept in float32"
            f"{' (bfloat16 with adamw_bf16)' if self.optimizer == 'adamw_bf16' else ''}.",
            f"optimizer {self.optimizer}, gradient_checkpointing {str(self.gradient_checkpointing).lower()}, "
            f"train_batch_size {self.train_batch_size} x gradient_accumulation_steps "
            f"{self.gradient_accumulation_steps}: about {self.estimate_gib:.1f} GiB estimated of the "
            f"{self.budget_gib:.1f} GiB budget (docs/memory.md; computed, not measured).",
        ] + (["mixture_offload_inactive true: only the training expert's weights and optimizer state stay on "
              "the GPU."] if self.mixture_offload_inactive else [])


def size_for(model: str, gpu_memory_gib: float, experts: int = 1) -> Sizing:
    """The settings that fit `model` ("ssd-1b" / "sdxl") in `gpu_memory_gib`; ConfigError when none does."""
    from expertune.models.memory import estimate

    budget = gpu_memory_gib * 0.85 - 1.5
    choices = (("adamw", False), ("adamw", True), ("adamw_bf16", True), ("adafactor", True))
    for optimizer, checkpointing in choices:
        for batch in (8, 4, 2, 1):
            one = estimate(model, optimizer, batch, checkpointing)
            resident = one.weights + one.optimizer_state  # what an idle expert of a mixture keeps
            offload = experts > 1 and (one.total + (experts - 1) * resident) / GIB > budget
            if one.total / GIB <= budget:
                total = one.total + (0 if offload else (experts - 1) * resident)
                return Sizing(optimizer, checkpointing, batch, max(1, RECIPE_BATCH // batch), offload,
                              total / GIB, budget)
    smallest = estimate(model, "adafactor", 1, True).total / GIB
    raise ConfigError(f"--gpu_memory {gpu_memory_gib:g}: {model} full-UNet training needs about "
                      f"{(smallest + 1.5) / 0.85:.0f} GiB even with Adafactor, gradient checkpointing and batch 1 "
                      "(docs/memory.md); use a larger GPU")


@dataclass(frozen=True)
class Setting:
    key: str
    value: str | int | float | bool
    why: str = ""


def _common(model: str, sizing: Sizing, folder: Path) -> list[Setting]:
    return [
        Setting("pretrained_model_name_or_path", MODELS[model], "a hub id (or a local diffusers folder)"),
        Setting("model_family", "sdxl"), Setting("model_type", "full", "the recipe trains the full UNet"),
        Setting("data_backend_config", str(folder / "multidatabackend.json"), "the dataloader JSON beside this file"),
        Setting("resolution", 1024), Setting("resolution_type", "pixel_area", "buckets of about 1024x1024 pixels"),
        Setting("mixed_precision", "bf16"), Setting("optimizer", sizing.optimizer),
        Setting("gradient_checkpointing", sizing.gradient_checkpointing),
        Setting("train_batch_size", sizing.train_batch_size),
        Setting("gradient_accumulation_steps", sizing.gradient_accumulation_steps,
                "an effective batch of 8, the recipe's"),
        Setting("learning_rate", 4e-7, "the recipe's: SSD-1B's own 1e-5 is for batches of 128"),
        Setting("lr_scheduler", "constant_with_warmup"), Setting("lr_warmup_steps", 100),
        Setting("max_train_steps", 10000), Setting("seed", 42),
        Setting("prediction_type", "v_prediction", "the recipe's re-parameterisation (leave both stages alike)"),
        Setting("rescale_betas_zero_snr", True), Setting("training_scheduler_timestep_spacing", "trailing"),
        Setting("inference_scheduler_timestep_spacing", "trailing"),
        Setting("resume_from_checkpoint", "latest", "a restarted run continues; the first starts fresh"),
        Setting("checkpointing_steps", 500, "SimpleTuner's name of checkpoint_step_interval"),
        Setting("checkpoints_total_limit", 3),
        Setting("validation_steps", 250, "SimpleTuner's name of validation_step_interval"),
        Setting("validation_on_startup", True, "images of the untouched model at step 0, to compare against"),
        Setting("user_prompt_library", str(folder / "user_prompt_library.json"), "the validation prompts"),
        Setting("validation_resolution", "1024x1024,1152x896", "a square and a landscape"),
        Setting("validation_num_inference_steps", 30), Setting("validation_guidance", 7.5),
        Setting("validation_guidance_rescale", 0.7, "recommended with zero-terminal SNR"),
        Setting("validation_seed", 42),
        Setting("eval_holdout_fraction", 0.02, "2 % of the images held out: the per-band validation loss"),
        Setting("report_to", "tensorboard"),
    ]


def stage_settings(model: str, layout: str, sizing: Sizing, folder: Path, output: Path) -> dict[str, list[Setting]]:
    """{file stem: settings} of a layout: stage1 / stage2 (the recipe), or one mixture."""
    common = _common(model, sizing, folder)
    if layout == "mixture":
        return {"mixture": [*common, Setting("output_dir", str(output / "mixture")),
                            Setting("mixture_boundaries", "350", "the recipe's split: t 350-999 and 0-349"),
                            Setting("mixture_offload_inactive", sizing.mixture_offload_inactive)]}
    stage1 = [*common, Setting("output_dir", str(output / "stage1")),
              Setting("refiner_training", True), Setting("refiner_training_strength", 0.35),
              Setting("refiner_training_invert_schedule", True, "stage 1: the high-noise band, t 350-999")]
    stage2 = [*common, Setting("output_dir", str(output / "stage2")),
              Setting("refiner_training", True), Setting("refiner_training_strength", 0.35, "t 0-349"),
              Setting("validation_using_datasets", True, "stage 2 validates by finishing noised dataset images"),
              Setting("validation_peer_expert", str(output / "stage1"), "and through the whole chain with stage 1")]
    return {"stage1": stage1, "stage2": stage2}


def _json_text(settings: list[Setting]) -> str:
    return json.dumps({f"--{s.key}": s.value for s in settings}, indent=4) + "\n"


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _toml_text(title: str, sizing: Sizing, settings: list[Setting]) -> str:
    lines = [f"# {title}: written by `expertune init`; train with `expertune train --config THIS_FILE`.",
             *(f"# {reason}" for reason in sizing.reasons()), ""]
    from expertune.config.simpletuner_flags import OPTIONS

    for s in settings:
        row = OPTIONS.get(s.key)
        key = row.target if row is not None and row.action == "alias" else s.key  # expertune's own name
        why = "" if key != s.key else s.why
        lines.append(f"{key} = {_toml_value(s.value)}" + (f"  # {why}" if why else ""))
    return "\n".join(lines) + "\n"


def _readme(model: str, layout: str, sizing: Sizing, files: dict[str, list[Setting]], paths: dict[str, Path],
            data: Path) -> str:
    run = ("\n".join(f"ENV={name} expertune train    # reads {paths[name]}" for name in files)
           if layout == "two-stage" else "expertune train    # reads config/config.json (run from the folder above)")
    lines = [f"# Starter configuration: {MODELS[model]}, {layout}", "",
             "Written by `expertune init`. JSON has no comments, so the choices are explained here.", "",
             "Run from the folder holding `config/`:", "", "```sh", run, "```", "",
             f"Put your images with same-named .txt captions in `{data}` first.", "", "## Sizing", "",
             *(f"- {reason}" for reason in sizing.reasons()), "", "## Settings", ""]
    for name, settings in files.items():
        lines += [f"### {paths[name]} ({name})", "", "| key | value | why |", "|---|---|---|"]
        lines += [f"| `--{s.key}` | `{json.dumps(s.value)}` | {s.why} |" for s in settings]
        lines.append("")
    return "\n".join(lines)


PROMPTS = {
    "portrait": "a close-up portrait of an old fisherman, weathered skin, soft window light",
    "street": "a rainy city street at night, neon reflections on wet asphalt",
    "still_life": "a bowl of lemons on a wooden table, morning light, shallow depth of field",
    "landscape": "a mountain lake at sunrise, mist over the water, pine forest",
}


def write_starter(folder: Path, model: str, layout: str, gpu_memory_gib: float, fmt: str = "json",
                  data: Path | None = None, output: Path | None = None) -> list[Path]:
    """Write the starter files into `folder`; refuses (ConfigError naming it) if any would overwrite a file."""
    if model not in MODELS or layout not in LAYOUTS or fmt not in FORMATS:
        raise ConfigError(f"init: --model one of {', '.join(MODELS)}; --layout one of {', '.join(LAYOUTS)}; "
                          f"--format one of {', '.join(FORMATS)}")
    data = data or Path("datasets") / "images"
    output = output or Path("output")
    sizing = size_for(model, gpu_memory_gib, experts=2 if layout == "mixture" else 1)
    files = stage_settings(model, layout, sizing, folder, output)
    if fmt == "json":
        paths = {name: folder / "config.json" if name == "mixture" else folder / name / "config.json"
                 for name in files}
        texts = {paths[n]: _json_text(s) for n, s in files.items()}
        texts[folder / "README.md"] = _readme(model, layout, sizing, files, paths, data)
    else:
        paths = {name: folder / f"{name}.toml" for name in files}
        texts = {paths[n]: _toml_text(f"{MODELS[model]}, {n}", sizing, s) for n, s in files.items()}
    cache = output / "cache"
    texts[folder / "multidatabackend.json"] = json.dumps([
        {"id": "my-images", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
         "resolution": 1024, "resolution_type": "pixel_area", "minimum_image_size": 768, "crop": True,
         "crop_style": "center", "crop_aspect": "preserve", "repeats": 0, "cache_dir_vae": str(cache / "vae")},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(cache / "text")}], indent=4) + "\n"
    texts[folder / "user_prompt_library.json"] = json.dumps(PROMPTS, indent=4) + "\n"
    existing = [path for path in texts if path.exists()]
    if existing:
        raise ConfigError(f"init: {existing[0]} already exists; nothing was written (init never overwrites: move it "
                          "away or choose another folder)")
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode("utf-8"))
    return list(texts)
