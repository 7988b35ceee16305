"""`expertune demo`: the recipe's journey on the committed world model, on a CPU, in a few minutes.

It starts from the pretrained world base (epsilon-prediction on SDXL's own schedule, as SSD-1B is), writes
the recipe's own config.env for stage 1 and stage 2 (word for word, with local paths), and trains both
experts sharing one cache, re-parameterised as the recipe says (v-prediction, zero-terminal SNR, trailing).
The fine-tuning set teaches something the base never saw: the world's held-out combinations (mixed with a
few of the pretrained ones so nothing is forgotten). Each expert is validated the way it is used, from step
0 (stage 2 also through the chain with stage 1), with the per-band held-out loss and the world CLIP's score.
It leaves `before_after.png` (the base chained with itself against the trained experts, same prompts and
seeds), `palette.png` (every shape colour on every background), each of those samples on its own in
`samples/{before,after,palette}/NN_<prompt>.png`, `report.json` with the figures, and each stage's run page as
one self-contained HTML file (`report_stage1.html`, `report_stage2.html`; `expertune report`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from expertune.data.captioned import write_dataloader_config
from expertune.demo.recipe import recipe_env
from expertune.errors import ModelError
from expertune.io_utils import atomic_write_bytes, atomic_write_json
from expertune.world import PRETRAINED
from expertune.world.scene import COLOURS, HELD_OUT, SHAPES, Combination, scenes, training_combinations

log = logging.getLogger(__name__)

DEMO_RESOLUTION = 64
SAMPLE_PROMPT = HELD_OUT[0].caption
HELD_OUT_IMAGES = 16  # per held-out combination
SEEN_IMAGES = 2  # per pretrained combination, so the fine-tune does not forget them
VALIDATION_PROMPTS = [c.caption for c in HELD_OUT[:4]]
# A tiny model of a world of flat colours wants little guidance: at 5 the colours overshoot the palette (measured
# on the demo's experts: both colours right 54 % at 5, 67 % at 3.5, 80 % at 1.5 over the 56 palette prompts).
GUIDANCE, GUIDANCE_RESCALE, INFERENCE_STEPS = 1.5, 0.7, 20
STEPS, REFINER_STEPS, LEARNING_RATE = 900, 300, 3e-4


@dataclass
class DemoResult:
    stage_dirs: tuple[Path, Path]
    sample: Path
    report: dict


def demo_overrides(steps: int, clip: Path, prompt_library: Path, learning_rate: float = LEARNING_RATE) -> list[str]:
    """CLI flags layered over the recipe's env: a tiny model learns at a far higher rate, in fewer steps.

    Validation runs at step 0 and at the end (and half-way), with the per-band loss on held-out images
    and the CLIP score under the world CLIP.
    """
    return [
        "--evaluation_type=clip", f"--pretrained_evaluation_model_name_or_path={clip}",
        "--eval_holdout_fraction=0.05", "--eval_subbands=4",
        f"--learning_rate={learning_rate}", "--lr_scheduler=cosine", "--lr_warmup_steps=20",
        f"--max_train_steps={steps}", f"--resolution={DEMO_RESOLUTION}",
        f"--validation_prompt={SAMPLE_PROMPT}", f"--validation_prompt_library={prompt_library}",
        "--validation_on_startup", f"--validation_step_interval={max(1, steps // 2)}",
        f"--validation_num_inference_steps={INFERENCE_STEPS}", f"--validation_guidance={GUIDANCE}",
        f"--validation_guidance_rescale={GUIDANCE_RESCALE}", "--caption_dropout_probability=0.1",
        "--vae_batch_size=64", "--text_encoder_batch_size=64", "--overwrite_output_dir",
    ]


def pretrained_world(world: str | os.PathLike = PRETRAINED) -> tuple[Path, Path]:
    """(base pipeline, evaluation CLIP) of a world model dir; a clear error when it is incomplete."""
    root = Path(world)
    base, clip = root / "base", root / "clip"
    for path in (base / "model_index.json", clip / "config.json"):
        if not path.is_file():
            fix = (f"restore it from git (git checkout -- {PRETRAINED}) or rebuild it" if root == PRETRAINED
                   else "build one")
            raise ModelError(f"world model {root} is missing {path.relative_to(root)}; {fix} with "
                             f"`expertune world build {root}`")
    return base, clip


def demo_scenes(seed: int = 7):
    """The fine-tuning set: the held-out combinations, plus a couple of images of each pretrained one."""
    return scenes(list(HELD_OUT), HELD_OUT_IMAGES, seed) + scenes(training_combinations(), SEEN_IMAGES, seed + 1)


def palette_prompts() -> list[str]:
    """Every (shape colour, background) pair once, the shape cycling through circle, square, triangle."""
    return [Combination(fg, SHAPES[(i + j) % 3], bg).caption
            for i, fg in enumerate(COLOURS) for j, bg in enumerate(COLOURS) if fg != bg]


def _final_scalars(stage_dir: Path) -> tuple[dict, dict]:
    """(first, last) validation rows of metrics.jsonl: the per-band loss and CLIP score at step 0 and at the end."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [r for r in rows if "eval/loss" in r]
    keep = lambda row: {k: v for k, v in row.items() if k.startswith(("eval/", "clip/")) or k == "step"}  # noqa: E731
    return keep(evaluations[0]), keep(evaluations[-1])


def compare_chains(base: Path, experts: list[Path], clip: Path, out: Path) -> dict:
    """Before/after on the held-out prompts (two seeds each) and the palette grid of the trained chain."""
    from expertune.infer.chain import image_grid, save_png
    from expertune.validate.metrics import ClipScorer
    from expertune.world.evaluate import base_stages, clip_score, colour_accuracy, expert_stages, sample_chain

    prompts = [c.caption for c in HELD_OUT] * 2
    scorer = ClipScorer(str(clip))  # one world CLIP for every score below
    before_stages = base_stages(base, guidance=GUIDANCE)
    after_stages = expert_stages(experts, guidance=GUIDANCE, rescale=GUIDANCE_RESCALE)
    before = sample_chain(before_stages, prompts, steps=INFERENCE_STEPS)
    after = sample_chain(after_stages, prompts, steps=INFERENCE_STEPS)
    save_png(image_grid(before[:len(HELD_OUT)] + after[:len(HELD_OUT)], columns=len(HELD_OUT)), out / "before_after.png")
    palette = palette_prompts()
    palette_images = sample_chain(after_stages, palette, steps=INFERENCE_STEPS, seed=100)
    save_png(image_grid(palette_images, columns=len(COLOURS) - 1), out / "palette.png")
    # Every chained sample on its own, named by its prompt, for anyone who wants to judge them one by one.
    for folder, images, texts in (("after", after, prompts), ("before", before, prompts),
                                  ("palette", palette_images, palette)):
        for index, (image, text) in enumerate(zip(images, texts)):
            save_png(image, out / "samples" / folder / f"{index:02d}_{text.replace(' ', '_')}.png")
    return {
        "held_out_prompts": {
            "before": {"clip": clip_score(before, prompts, scorer), **colour_accuracy(before, prompts).as_dict()},
            "after": {"clip": clip_score(after, prompts, scorer), **colour_accuracy(after, prompts).as_dict()},
        },
        "palette": {"clip": clip_score(palette_images, palette, scorer), **colour_accuracy(palette_images, palette).as_dict()},
    }


def run_demo(out: str | os.PathLike = "outputs/demo", steps: int = STEPS, refiner_steps: int | None = REFINER_STEPS,
             world: str | os.PathLike = PRETRAINED, learning_rate: float = LEARNING_RATE) -> DemoResult:
    """Train stage 1 for `steps` and stage 2 for `refiner_steps` (default: `steps`), then compare and report."""
    from expertune.config import load_config
    from expertune.infer.chain import generate, save_png
    from expertune.train.loop import train
    from expertune.world.dataset import write_world_dataset

    started = time.perf_counter()
    base, clip = pretrained_world(world)
    root = Path(out).resolve()
    images = write_world_dataset(root / "data", demo_scenes())
    dataloader = write_dataloader_config(root / "dataloader.json", images, root / "cache", DEMO_RESOLUTION)
    library = root / "validation_prompts.txt"
    atomic_write_bytes(library, ("\n".join(VALIDATION_PROMPTS) + "\n").encode("utf-8"))

    stage_dirs: list[Path] = []
    for number in (1, 2):
        output = root / f"stage{number}"
        env_file = root / f"stage{number}.env"
        atomic_write_bytes(env_file, recipe_env(number, base, output, dataloader).encode("utf-8"))
        log.info("stage %d: training with %s", number, env_file)
        # Stage 2 also validates the whole chain through the stage 1 expert just trained.
        peer = [f"--validation_peer_expert={stage_dirs[0]}"] if stage_dirs else []
        stage_steps = steps if number == 1 or refiner_steps is None else refiner_steps
        config, _warnings = load_config(["--env", str(env_file), *demo_overrides(stage_steps, clip, library,
                                                                                 learning_rate), *peer])
        train(config)
        stage_dirs.append(output)

    image = generate(stage_dirs, SAMPLE_PROMPT, num_inference_steps=INFERENCE_STEPS, guidance_scale=GUIDANCE,
                     guidance_rescale=GUIDANCE_RESCALE, seed=0)
    sample = save_png(image, root / "sample.png")
    report = {"steps": {"stage1": steps, "stage2": refiner_steps or steps}, "learning_rate": learning_rate,
              **compare_chains(base, stage_dirs, clip, root)}
    for number, stage_dir in zip((1, 2), stage_dirs):
        first, last = _final_scalars(stage_dir)
        report[f"stage{number}"] = {"step_0": first, "final": last}
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(root / "report.json", report)
    from expertune.ui.report import write_report

    for number, stage_dir in zip((1, 2), stage_dirs):  # the run pages, self-contained (docs/ui.md)
        write_report(stage_dir, root / f"report_stage{number}.html")
    before, after = report["held_out_prompts"]["before"], report["held_out_prompts"]["after"]
    log.info("held-out prompts, base chain -> trained experts: CLIP %.1f -> %.1f, colours right %.0f%% -> %.0f%%",
             before["clip"], after["clip"], 100 * before["colour/both"], 100 * after["colour/both"])
    log.info("before/after grid %s, palette %s, report %s (%.0f s)", root / "before_after.png", root / "palette.png",
             root / "report.json", report["seconds"])
    return DemoResult((stage_dirs[0], stage_dirs[1]), sample, report)
