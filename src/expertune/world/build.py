"""`expertune world build DIR`: the pretrained world model, rebuilt from nothing, deterministically on a CPU.

The parts, each in a process of its own with one thread (deterministic, and two run side by side on two cores):

  phase 1   vae             AutoencoderKL fitted to world images; scaling_factor from the latents' spread
            text_encoders   tokenizers with one token per world word; SDXL's two text encoders trained as
                            CLIP text towers
  phase 2   unet            an SSD-1B-shaped UNet pretrained on all 1000 timesteps, epsilon-prediction, SDXL's
                            own schedule, by `expertune train` itself (full band, from a random UNet)
            eval_clip       a separate CLIP (CLIPModel + CLIPProcessor) for `--evaluation_type=clip`

DIR receives `base/` (a diffusers StableDiffusionXLPipeline, fp16 weights), `clip/`, `build_log.jsonl` (every
part's losses) and `manifest.json` (each file's sha256, the figures, the recipe and the command).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertune.errors import ExpertuneError
from expertune.io_utils import atomic_write_bytes, atomic_write_json, staged_directory
from expertune.world.clip import ClipRecipe
from expertune.world.vae import VaeRecipe

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
WEIGHTS_LIMIT_BYTES = 40 * 1024 * 1024


@dataclass(frozen=True)
class UnetRecipe:
    steps: int = 4000
    batch: int = 16
    learning_rate: float = 6e-4
    warmup_steps: int = 200
    images_per_combination: int = 24
    caption_dropout: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class BuildRecipe:
    vae: VaeRecipe = field(default_factory=VaeRecipe)
    text_encoders: ClipRecipe = field(default_factory=lambda: ClipRecipe(steps=1500, seed=1))
    # The evaluation CLIP sees 32 px (patch 4: 64 tokens) and trains on sizes wider than the world's, so that
    # only outlines tell its shapes apart (clip._Batches).
    eval_clip: ClipRecipe = field(default_factory=lambda: ClipRecipe(
        steps=5000, seed=2, image_size=32, patch_size=4, vision_layers=4, shape_siblings=True,
        radius_range=(0.18, 0.45)))
    unet: UnetRecipe = field(default_factory=UnetRecipe)
    evaluation_images: int = 2  # per combination, for PSNR and zero-shot accuracy


FULL = BuildRecipe()
# A few steps of every part: what the tests run so that the builder cannot rot.
MINIATURE = BuildRecipe(
    vae=VaeRecipe(crop_steps=3, full_steps=2),
    text_encoders=ClipRecipe(steps=3, seed=1),
    eval_clip=ClipRecipe(steps=3, seed=2, image_size=32, patch_size=4, vision_layers=4, shape_siblings=True,
                         radius_range=(0.18, 0.45)),
    unet=UnetRecipe(steps=3, batch=4, warmup_steps=1, images_per_combination=1),
    evaluation_images=1,
)
RECIPES = {"full": FULL, "miniature": MINIATURE}


def world_unet_config() -> dict:
    """The tiny UNet (SSD-1B's block layout at toy width) for 8x8 latents (64 px images) and the world's encoders."""
    from expertune.models.tiny import tiny_unet_config
    from expertune.world.clip import TEXT_ENCODER_1, TEXT_ENCODER_2

    return tiny_unet_config(8, text_widths=(TEXT_ENCODER_1.width, TEXT_ENCODER_2.width),
                            pooled_width=TEXT_ENCODER_2.projection_dim, time_embed_dim=16)


# ---------------------------------------------------------------------------------------------------------
# The parts (each runs in its own single-threaded process: `python -m expertune.world.build PART WORK RECIPE`)
# ---------------------------------------------------------------------------------------------------------


def _evaluation_scenes(recipe: BuildRecipe):
    """Images never seen in training: fresh scenes of the training combinations, and the held-out ones."""
    from expertune.world.scene import HELD_OUT, scenes, training_combinations

    return (scenes(training_combinations(), recipe.evaluation_images, seed=10_001),
            scenes(list(HELD_OUT), max(4, 4 * recipe.evaluation_images), seed=10_002))


def part_vae(work: Path, recipe: BuildRecipe) -> dict:
    from expertune.world.scene import render_batch, training_combinations
    from expertune.world.vae import evaluate_vae, train_vae

    vae, rows = train_vae(training_combinations(), recipe.vae)
    seen, held = _evaluation_scenes(recipe)
    figures = evaluate_vae(vae, render_batch(seen + held))
    figures["psnr_db_held_out_combinations"] = evaluate_vae(vae, render_batch(held))["psnr_db"]
    vae.register_to_config(scaling_factor=round(1.0 / figures["latent_std"], 5))
    figures["scaling_factor"] = vae.config.scaling_factor
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    return {"figures": figures, "log": rows}


def part_text_encoders(work: Path, recipe: BuildRecipe) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from expertune.world.clip import TEXT_ENCODER_1, TEXT_ENCODER_2, caption_spread, text_config, train_text_encoders
    from expertune.world.scene import training_combinations
    from expertune.world.tokenizer import write_world_tokenizer

    # SDXL pads its first tokenizer with <|endoftext|> and its second with "!": keep that quirk.
    tokenizer_1 = CLIPTokenizer.from_pretrained(str(write_world_tokenizer(work / "tokenizer")))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(write_world_tokenizer(work / "tokenizer_2", pad_token="!")))
    torch.manual_seed(recipe.text_encoders.seed + 1000)
    random_spread = caption_spread(CLIPTextModel(CLIPTextConfig(**text_config(TEXT_ENCODER_1, tokenizer_1))),
                                   CLIPTextModelWithProjection(CLIPTextConfig(**text_config(TEXT_ENCODER_2, tokenizer_2))),
                                   tokenizer_1, tokenizer_2)
    text_1, text_2, rows = train_text_encoders(tokenizer_1, tokenizer_2, training_combinations(), recipe.text_encoders)
    text_1.save_pretrained(str(work / "text_encoder"), safe_serialization=True)
    text_2.save_pretrained(str(work / "text_encoder_2"), safe_serialization=True)
    trained = caption_spread(text_1, text_2, tokenizer_1, tokenizer_2)
    figures = {"caption_spread_random": random_spread, "caption_spread_trained": trained,
               "tokens_per_world_word": 1}
    return {"figures": figures, "log": rows}


def part_eval_clip(work: Path, recipe: BuildRecipe) -> dict:
    from transformers import CLIPTokenizer

    from expertune.world.clip import train_eval_clip, zero_shot_accuracy
    from expertune.world.scene import render, training_combinations
    from expertune.world.tokenizer import write_world_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_world_tokenizer(Path(scratch) / "tokenizer")))
    model, processor, rows = train_eval_clip(tokenizer, training_combinations(), recipe.eval_clip)
    seen, held = _evaluation_scenes(recipe)
    figures = {
        "zero_shot_accuracy_held_out_images": zero_shot_accuracy(model, processor, [render(s) for s in seen],
                                                                 [s.caption for s in seen]),
        "zero_shot_accuracy_held_out_combinations": zero_shot_accuracy(
            model, processor, [render(s) for s in held], [s.caption for s in held]),
        "captions": 168,
    }
    model.save_pretrained(str(work / "clip"), safe_serialization=True)
    processor.save_pretrained(str(work / "clip"))
    return {"figures": figures, "log": rows}


def _initial_pipeline(work: Path, seed: int) -> Path:
    """The pipeline `expertune train` starts from: the trained VAE and text encoders, a random UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from expertune.models.tiny import tiny_scheduler_config

    torch.manual_seed(seed)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(str(work / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(work / "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(work / "text_encoder_2")),
        tokenizer=CLIPTokenizer.from_pretrained(str(work / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(work / "tokenizer_2")),
        unet=UNet2DConditionModel(**world_unet_config()),
        scheduler=EulerDiscreteScheduler(**tiny_scheduler_config()),
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(str(work / "initial"), safe_serialization=True)
    return work / "initial"


def unet_training_flags(model: Path, output: Path, dataloader: Path, recipe: UnetRecipe) -> list[str]:
    """`expertune train` flags of the base's pretraining: every timestep, epsilon, SDXL's own schedule."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--output_dir={output}", f"--data_backend_config={dataloader}",
        "--resolution=64", f"--train_batch_size={recipe.batch}", f"--max_train_steps={recipe.steps}",
        f"--learning_rate={recipe.learning_rate}", "--lr_scheduler=cosine", f"--lr_warmup_steps={recipe.warmup_steps}",
        "--adam_weight_decay=0.01", f"--caption_dropout_probability={recipe.caption_dropout}",
        "--prediction_type=epsilon", "--training_scheduler_timestep_spacing=leading",
        "--inference_scheduler_timestep_spacing=leading", f"--seed={recipe.seed}", "--validation_disable",
        "--report_to=none", "--vae_batch_size=64", "--text_encoder_batch_size=64", "--overwrite_output_dir",
    ]


def part_unet(work: Path, recipe: BuildRecipe) -> dict:
    from expertune.data.captioned import write_dataloader_config
    from expertune.world.dataset import write_world_dataset
    from expertune.world.scene import scenes, training_combinations

    model = _initial_pipeline(work, recipe.unet.seed)
    drawn = scenes(training_combinations(), recipe.unet.images_per_combination, seed=recipe.unet.seed + 500)
    images = write_world_dataset(work / "data", drawn)
    dataloader = write_dataloader_config(work / "dataloader.json", images, work / "cache", 64)
    output = work / "unet_run"
    command = [sys.executable, "-m", "expertune.cli", "train", *unet_training_flags(model, output, dataloader, recipe.unet)]
    log.info("unet: %s", " ".join(command))
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    return {"figures": {"steps": recipe.unet.steps, "images": len(drawn),
                        "final_loss_mean_last_100": sum(r["loss"] for r in losses[-100:]) / max(1, len(losses[-100:]))},
            "log": [{"part": "unet", **r} for r in losses]}


PARTS = {"vae": part_vae, "text_encoders": part_text_encoders, "unet": part_unet, "eval_clip": part_eval_clip}
PHASES = (("vae", "text_encoders"), ("unet", "eval_clip"))
# What each part's output depends on (the UNet is trained on the VAE's latents and the encoders' embeddings).
INPUTS = {"vae": ("vae",), "text_encoders": ("text_encoders",), "unet": ("vae", "text_encoders", "unet"),
          "eval_clip": ("eval_clip",)}


def part_key(name: str, recipe: BuildRecipe) -> dict:
    """Everything a part's output is a function of: the recipes of the part and of its inputs."""
    return {"evaluation_images": recipe.evaluation_images,
            **{part: dataclasses.asdict(getattr(recipe, part)) for part in INPUTS[name]}}


def _run_part(name: str, work: Path, recipe_name: str) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    recipe = RECIPES[recipe_name]
    result = PARTS[name](work, recipe)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["key"] = part_key(name, recipe)
    atomic_write_json(work / f"{name}.json", result)


def _reusable(name: str, work: Path, recipe_name: str) -> bool:
    """A part finished in `work` by an earlier build of the same recipe (the build is deterministic)."""
    done = work / f"{name}.json"
    if not done.is_file():
        return False
    return json.loads(done.read_text()).get("key") == json.loads(json.dumps(part_key(name, RECIPES[recipe_name])))


def reusable_parts(earlier_recipe: dict, recipe: BuildRecipe) -> list[str]:
    """The parts an earlier build (its manifest's `recipe`) made exactly as `recipe` would, and may lend.

    A part is lent when its key (its own recipe and its inputs') is unchanged (a recipe field added since then
    counts as its default in the earlier build), and only when no part that is
    rebuilt takes it as an input: a lent part comes from the earlier build's fp16 files, and a part trained
    on fp16-rounded inputs would differ from the same part built from nothing.
    """
    def defaults(part: str) -> dict:
        """A part recipe's field defaults: a field added since the earlier build reads as its default there."""
        return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(getattr(recipe, part))
                                      if f.default is not dataclasses.MISSING}))

    def key_of(name: str, source: dict) -> dict:
        parts = {p: {**defaults(p), **source[p]} if isinstance(source.get(p), dict) else None for p in INPUTS[name]}
        return {"evaluation_images": source.get("evaluation_images"), **parts}

    current = json.loads(json.dumps(dataclasses.asdict(recipe)))
    lent = {name for name in PARTS if key_of(name, earlier_recipe) == key_of(name, current)}
    changed = True
    while changed:
        changed = False
        for name in list(lent):
            if any(name in INPUTS[other] and other not in lent for other in PARTS):
                lent.discard(name)
                changed = True
    return [name for name in PARTS if name in lent]


# Where each part's output lies in a finished build, and where its work files go.
_LENT_FILES = {"vae": (("base/vae", "vae"),),
               "text_encoders": tuple((f"base/{d}", d) for d in ("text_encoder", "text_encoder_2", "tokenizer",
                                                                  "tokenizer_2")),
               "unet": (("base", "unet_run/pipeline"),),
               "eval_clip": (("clip", "clip"),)}


def lend_parts(earlier: Path, work: Path, recipe_name: str) -> list[str]:
    """Seed `work` with the parts of the verified build at `earlier` that `reusable_parts` allows; their names."""
    problems = verify_world(earlier)
    if problems:
        raise ExpertuneError(f"world build --reuse {earlier}: it does not match its manifest ({problems[0]}); "
                             f"restore it from git or build without --reuse")
    manifest = json.loads((earlier / "manifest.json").read_text())
    lent = reusable_parts(manifest.get("recipe", {}), RECIPES[recipe_name])
    rows: dict[str, list[dict]] = {}
    for line in (earlier / "build_log.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["part"], []).append(row)
    for name in lent:
        for source, target in _LENT_FILES[name]:
            shutil.rmtree(work / target, ignore_errors=True)
            shutil.copytree(earlier / source, work / target)
        atomic_write_json(work / f"{name}.json", {
            "figures": manifest["figures"][name], "log": rows.get(name, []), "seconds": manifest["seconds"][name],
            "key": part_key(name, RECIPES[recipe_name]), "lent_from": str(earlier)})
    return lent


# ---------------------------------------------------------------------------------------------------------
# Orchestration and the manifest
# ---------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_phase(names: tuple[str, ...], work: Path, recipe_name: str) -> None:
    reused = [name for name in names if _reusable(name, work, recipe_name)]
    for name in reused:
        log.info("world build: reusing part %s from %s (same recipe and inputs)", name, work)
    names = tuple(name for name in names if name not in reused)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes = {name: subprocess.Popen([sys.executable, "-m", "expertune.world.build", name, str(work), recipe_name],
                                        env=environment) for name in names}
    failed = [name for name, process in processes.items() if process.wait() != 0]
    if failed:
        raise ExpertuneError(f"world build: part(s) {', '.join(failed)} failed (see the log above); nothing was "
                             f"written to the output directory; the work files are in {work}")


def _export_base(work: Path, target: Path) -> None:
    """The pretrained base in fp16 storage, with SDXL's own scheduler: a plain diffusers pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from expertune.models.tiny import tiny_scheduler_config

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(work / "unet_run" / "pipeline"), use_safetensors=True)
    pipeline.scheduler = EulerDiscreteScheduler(**tiny_scheduler_config())
    pipeline.to(torch.float16)
    # diffusers records where each part was loaded from (`_name_or_path`): a fixed name, not the work folder,
    # so two builds write the same bytes.
    for name, component in pipeline.components.items():
        if hasattr(component, "register_to_config"):
            component.register_to_config(_name_or_path=f"expertune-world/base/{name}")
    pipeline.register_to_config(_name_or_path="expertune-world/base")
    pipeline.save_pretrained(str(target), safe_serialization=True)


def _export_clip(work: Path, target: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    # Loaded as float32 whatever the stored dtype (a part lent by --reuse is fp16), so the saved config is the same.
    model = CLIPModel.from_pretrained(str(work / "clip"), dtype=torch.float32)
    model.to(torch.float16).save_pretrained(str(target), safe_serialization=True)
    CLIPProcessor.from_pretrained(str(work / "clip")).save_pretrained(str(target))


def file_table(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def build_world(out: str | os.PathLike, recipe_name: str = "full", work: str | os.PathLike | None = None,
                reuse: str | os.PathLike | None = None) -> dict:
    """Build the world model into `out` (replaced atomically); returns the manifest.

    `reuse`: an earlier build whose unchanged parts are taken instead of trained again (`lend_parts`); the
    result is the same as a build from nothing, since every part is deterministic.
    """
    if recipe_name not in RECIPES:
        raise ExpertuneError(f"unknown world recipe {recipe_name!r}; choose one of {', '.join(RECIPES)}")
    started = time.perf_counter()
    scratch: str | None = None  # a work folder of our own, removed at the end
    if work is None:
        scratch = work = tempfile.mkdtemp(prefix="expertune-world-")
    work_dir = Path(work).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        lent = lend_parts(Path(reuse), work_dir, recipe_name) if reuse is not None else []
        if lent:
            log.info("world build: parts %s taken from %s (unchanged recipes)", ", ".join(lent), reuse)
        for phase in PHASES:
            _run_phase(phase, work_dir, recipe_name)
        parts = {name: json.loads((work_dir / f"{name}.json").read_text()) for name in PARTS}
        with staged_directory(out) as staged:
            _export_base(work_dir, staged / "base")
            _export_clip(work_dir, staged / "clip")
            log_lines = [json.dumps(row, sort_keys=True) for name in PARTS for row in parts[name]["log"]]
            atomic_write_bytes(staged / "build_log.jsonl", ("\n".join(log_lines) + "\n").encode())
            files = file_table(staged)
            weights = sum(entry["bytes"] for name, entry in files.items() if name.endswith(".safetensors"))
            if weights > WEIGHTS_LIMIT_BYTES:
                raise ExpertuneError(f"world build: weights are {weights / 2**20:.1f} MiB, over the 40 MiB limit")
            manifest = {
                "format_version": MANIFEST_VERSION,
                "command": f"expertune world build DIR --recipe {recipe_name}",
                "recipe_name": recipe_name,
                "recipe": dataclasses.asdict(RECIPES[recipe_name]),
                "figures": {name: parts[name]["figures"] for name in PARTS},
                # Each part's own time; from_nothing: the phases' slowest parts, one after the other (a build
                # that reuses finished parts from --work takes less: this_invocation).
                "seconds": {**{name: parts[name]["seconds"] for name in PARTS},
                            "from_nothing": round(sum(max(parts[n]["seconds"] for n in phase) for phase in PHASES), 1),
                            "this_invocation": round(time.perf_counter() - started, 1)},
                # The parts this invocation took from an earlier build (--reuse) instead of training them.
                "lent_parts": [name for name in PARTS if "lent_from" in parts[name]],
                "weights_bytes": weights,
                "versions": _versions(),
                "files": files,
            }
            atomic_write_json(staged / "manifest.json", manifest)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def verify_world(directory: str | os.PathLike) -> list[str]:
    """Problems of a world model directory against its manifest (empty: every file is as built)."""
    root = Path(directory)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    actual = file_table(root)
    for name, entry in manifest["files"].items():
        if name not in actual:
            problems.append(f"{name}: missing")
        elif actual[name]["sha256"] != entry["sha256"]:
            problems.append(f"{name}: sha256 {actual[name]['sha256'][:12]} differs from the manifest's {entry['sha256'][:12]}")
    problems += [f"{name}: not in the manifest" for name in actual if name not in manifest["files"]]
    return problems


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _run_part(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
