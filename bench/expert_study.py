"""Does splitting the schedule into experts help, at equal compute? Three arms on the world model.

All arms start from the committed world base (epsilon, SDXL's schedule), are re-parameterised as the recipe
does (v-prediction, zero-terminal SNR, trailing), train on the demo's fine-tuning set with the same batch, and
spend the same total number of optimizer steps S; every chain samples with the same 20 steps, so inference
costs the same:

  one_model    one model fine-tuned on all timesteps [0, 999] for S steps
  two_experts  the recipe: stage 1 [350, 999] and stage 2 [0, 349], each from the base; the steps are divided
               in proportion to the band sizes (0.65 S and 0.35 S), so every timestep gets the same expected
               number of training samples as in one_model: the split changes who learns a timestep, not how
               much it is trained
  branching    eDiff-I style: a shared fine-tune on [0, 999] for S/2 steps, then split into the two experts for
               the other S/2 (0.65 / 0.35 again), each starting from the shared weights
  joint_two    the recipe's two experts trained together in one job (`--mixture_boundaries 350`,
               `--mixture_schedule proportional`: the same 0.65 / 0.35 shares of the S steps, interleaved)
  three_experts  a mixture of three (`--mixture_boundaries 700,350`: [700, 999], [350, 699], [0, 349]) in one
               job, steps in proportion to the bands (0.30 / 0.35 / 0.35 S)
  shared_start branching as one job (`--mixture_boundaries 350 --mixture_shared_steps 0.5`): a shared trunk on
               [0, 999] for S/2 steps, then the two experts branch from it with its optimizer state, EMA and data
               position (0.65 / 0.35 of the other S/2). `branching` stays the separate-jobs recipe its recorded
               results came from (each expert a fresh optimizer from the shared weights)

Metrics per (arm, seed): the chain's held-out loss in 8 sub-bands of [0, 999] (5 in the high-noise band, 3 in the
low; each timestep scored by the expert that owns it, fixed noise), the world CLIP's score of the chained samples,
and the colour judge's accuracy (centre = shape colour, border = background) on held-out and pretrained prompts.

    .venv/bin/python bench/expert_study.py            # 3 seeds, S = 800: about 15 min on 2 cores
    .venv/bin/python bench/expert_study.py --quick    # 2 seeds, S = 40: a few minutes

Knobs per arm (issue 23): `--variant NAME=ARM:FLAGS` adds an arm NAME that trains as ARM with FLAGS appended to every
one of its runs, so a knob's effect on each band sits beside the plain arm in the same table, e.g.

    .venv/bin/python bench/expert_study.py --arms two_experts --variant "two_huber=two_experts:--loss_type=huber"
    .venv/bin/python bench/expert_study.py --arms joint_two \
        --variant "joint_later=joint_two:--timestep_bias_strategy=later --timestep_bias_multiplier=2 --flip_images"

Results: OUT/results.json, OUT/table.md, OUT/chart.png (default OUT: outputs/expert_study).
Tasks run in `--jobs` processes of one thread each (two side by side on two cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

BOUNDARY = 350
HIGH_SHARE = (1000 - BOUNDARY) / 1000
ARMS = ("one_model", "two_experts", "branching", "joint_two", "three_experts", "shared_start")
MIXTURES = {"joint_two": "350", "three_experts": "700,350", "shared_start": "350"}
SHARED_STEPS = {"shared_start": "0.5"}  # --mixture_shared_steps of the mixture arms that have a shared start
Band = tuple[int, int] | str  # a timestep range, or a mixture plan (--mixture_boundaries)


def plan(arm: str, steps: int) -> list[tuple[str, Band, int, str]]:
    """(name, band or mixture plan, steps, start from: 'base' or an earlier run's name) of each training run."""
    def split(total: int, start: str) -> list[tuple[str, Band, int, str]]:
        high = round(total * HIGH_SHARE)
        return [("stage1", (BOUNDARY, 999), high, start), ("stage2", (0, BOUNDARY - 1), total - high, start)]

    if arm == "one_model":
        return [("all", (0, 999), steps, "base")]
    if arm == "two_experts":
        return split(steps, "base")
    if arm == "branching":
        shared = steps // 2
        return [("shared", (0, 999), shared, "base"), *split(steps - shared, "shared")]
    if arm in MIXTURES:
        return [("mixture", MIXTURES[arm], steps, "base")]
    raise ValueError(arm)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """`NAME=ARM:FLAGS` -> (name, arm, flags): an arm that trains as ARM with FLAGS added to each run."""
    import shlex

    name, _, rest = text.partition("=")
    arm, _, flags = rest.partition(":")
    name, arm = name.strip(), arm.strip()
    if not name or arm not in ARMS or name in ARMS:
        raise ValueError(f"--variant {text!r}: write NAME=ARM:FLAGS with a new NAME and ARM one of {', '.join(ARMS)}")
    return name, arm, shlex.split(flags)


def train_flags(model: Path, output: Path, dataloader: Path, band: Band, steps: int, seed: int,
                learning_rate: float, shared_steps: str | None = None) -> list[str]:
    which = ([f"--mixture_boundaries={band}", "--mixture_schedule=proportional"] if isinstance(band, str)
             else [f"--timestep_range={band[0]},{band[1]}"])
    if shared_steps is not None:
        which.append(f"--mixture_shared_steps={shared_steps}")
    return [
        f"--pretrained_model_name_or_path={model}", f"--output_dir={output}", f"--data_backend_config={dataloader}",
        *which, "--prediction_type=v_prediction", "--rescale_betas_zero_snr",
        "--training_scheduler_timestep_spacing=trailing", "--inference_scheduler_timestep_spacing=trailing",
        "--resolution=64", "--train_batch_size=8", f"--max_train_steps={steps}", f"--learning_rate={learning_rate}",
        "--lr_scheduler=cosine", f"--lr_warmup_steps={max(1, steps // 20)}", "--caption_dropout_probability=0.1",
        f"--seed={seed}", "--validation_disable", "--report_to=none", "--overwrite_output_dir",
    ]


def run_flags(task: dict, model: Path, output: Path, band: Band, steps: int) -> list[str]:
    """The flags of one training run of `task`: the study's, then a --variant's own."""
    return train_flags(model, output, Path(task["dataloader"]), band, steps, task["seed"], task["learning_rate"],
                       SHARED_STEPS.get(task["arm"])) + list(task.get("extra_flags", []))


def evaluation_set(seed: int = 4242, seen: int = 24, repeats: int = 2):
    """Fresh images and prompts no run trained on: each held-out combination `repeats` times, and `seen`
    pretrained ones."""
    from expertune.world.scene import HELD_OUT, scenes, training_combinations

    rng = random.Random(seed)
    return scenes(list(HELD_OUT), repeats, seed) + scenes(rng.sample(training_combinations(), seen), 1, seed + 1)


def finished_run(output: Path, steps: int, seed: int) -> bool:
    """Whether `output` holds a finished training run of `steps` steps at `seed` (its run.json says so)."""
    try:
        run = json.loads((output / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return run.get("steps") == steps and run.get("config", {}).get("train", {}).get("seed") == seed


def run_task(task: dict) -> dict:
    """Train one arm at one seed and evaluate its chain (in a single-threaded worker process).

    With `task["evaluate_only"]`, the runs already under `task["out"]` are evaluated instead (each must be a
    finished run of the planned steps and seed)."""
    import torch

    torch.set_num_threads(1)
    from expertune.config import load_config
    from expertune.schedule import NoiseSchedule
    from expertune.train.loop import train
    from expertune.validate.metrics import ClipScorer
    from expertune.world.evaluate import (chain_held_out_loss, chain_subbands, clip_score, colour_accuracy,
                                          expert_stages, held_out_samples, sample_chain)
    from expertune.world.scene import HELD_OUT, render

    started = time.perf_counter()
    root = Path(task["out"]) / task["arm"] / f"seed{task['seed']}"
    outputs: dict[str, Path] = {"base": Path(task["base"])}
    kind = task.get("trains_as", task["arm"])  # a --variant trains as its arm, with its extra flags
    for name, band, steps, start in plan(kind, task["steps"]):
        start_model = outputs[start] if start == "base" else outputs[start] / "pipeline"
        outputs[name] = root / name
        if task.get("evaluate_only"):
            if not finished_run(root / name, steps, task["seed"]):
                raise SystemExit(f"--evaluate_only: {root / name} is not a finished run of {steps} steps at seed "
                                 f"{task['seed']}; run the study without --evaluate_only")
            continue
        flags = run_flags(task, start_model, root / name, band, steps)
        config, _ = load_config(flags)
        train(config)
    if kind in MIXTURES:
        from expertune.infer.chain import mixture_expert_paths

        experts = mixture_expert_paths(outputs["mixture"])
    else:
        experts = [outputs[name] for name, *_ in plan(kind, task["steps"]) if name != "shared"]
    from expertune.demo.run import GUIDANCE, GUIDANCE_RESCALE

    stages = expert_stages(experts, guidance=GUIDANCE, rescale=GUIDANCE_RESCALE)
    drawn = evaluation_set(seen=task.get("seen", 24), repeats=task.get("repeats", 2))  # smaller only in tests
    prompts = [s.caption for s in drawn]
    held = {c.caption for c in HELD_OUT}
    samples = held_out_samples(stages[0], [render(s) for s in drawn], prompts)
    schedule = NoiseSchedule.from_scheduler_config(dict(stages[0].components["scheduler"].config))
    losses = chain_held_out_loss(stages, samples, schedule, chain_subbands((BOUNDARY,)), seed=task["seed"])
    images = sample_chain(stages, prompts, seed=1000)
    held_index = [i for i, p in enumerate(prompts) if p in held]
    seen_index = [i for i, p in enumerate(prompts) if p not in held]
    pick = lambda items, index: [items[i] for i in index]  # noqa: E731
    result = {
        "arm": task["arm"], "seed": task["seed"], **losses,
        "clip": clip_score(images, prompts, ClipScorer(task["clip"])),
        **{f"held_out/{k}": v for k, v in colour_accuracy(pick(images, held_index), pick(prompts, held_index)).as_dict().items()},
        **{f"seen/{k}": v for k, v in colour_accuracy(pick(images, seen_index), pick(prompts, seen_index)).as_dict().items()},
        **colour_accuracy(images, prompts).as_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    from expertune.infer.chain import image_grid, save_png

    save_png(image_grid(images[:24], columns=12), root / "samples.png")
    return result


def summarise(results: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """arm -> metric -> (mean, sample standard deviation over seeds); the study's arms first, then variants."""
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    variants = sorted({r["arm"] for r in results} - set(ARMS))
    for arm in (*ARMS, *variants):
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        metrics = [k for k in rows[0] if k not in ("arm", "seed")]
        summary[arm] = {k: (statistics.fmean(r[k] for r in rows),
                            statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0) for k in metrics}
    return summary


def loss_keys(summary: dict) -> list[str]:
    first = next(iter(summary.values()))
    return sorted((k for k in first if k.startswith("eval/loss_")), key=lambda k: int(k.split("_")[1]))


def markdown_table(summary: dict, seeds: int, steps: int) -> str:
    keys = loss_keys(summary)
    columns = [*keys, "eval/loss", "clip", "held_out/colour/both", "seen/colour/both", "colour/shape",
               "colour/background"]
    names = {k: k.replace("eval/loss_", "loss ").replace("_", "–") if k.startswith("eval/loss_") else k for k in columns}
    lines = [f"S = {steps} optimizer steps of batch 8 per arm, {seeds} seeds, mean ± standard deviation over seeds.", "",
             "| metric | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    for key in columns:
        cells = []
        for arm in summary:
            mean, spread = summary[arm][key]
            cells.append(f"{mean:.4f} ± {spread:.4f}" if "loss" in key else
                         f"{mean:.1f} ± {spread:.1f}" if key == "clip" else f"{100 * mean:.0f}% ± {100 * spread:.0f}")
        lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = loss_keys(summary)
    centres = [(int(k.split("_")[1]) + int(k.split("_")[2])) / 2 for k in keys]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, values in summary.items():
        left.errorbar(centres, [values[k][0] for k in keys], yerr=[values[k][1] for k in keys], marker="o",
                      capsize=3, label=arm)
    left.axvline(BOUNDARY - 0.5, color="grey", linestyle=":", label="hand-off t=350")
    left.set(xlabel="timestep (sub-band centre)", ylabel="held-out v-prediction loss",
             title="chain's held-out loss by sub-band")
    left.legend()
    metrics = ["held_out/colour/both", "seen/colour/both"]
    width = 0.8 / len(summary)
    for index, (arm, values) in enumerate(summary.items()):
        xs = [m + index * width for m in range(len(metrics))]
        right.bar(xs, [100 * values[m][0] for m in metrics], width, yerr=[100 * values[m][1] for m in metrics],
                  capsize=3, label=arm)
    right.set_xticks([m + width * (len(summary) - 1) / 2 for m in range(len(metrics))],
                     ["held-out combinations", "pretrained combinations"])
    right.set(ylabel="colours right (centre and border), %", ylim=(0, 100), title="colour judge on chained samples")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, S = 40: the machinery in a few minutes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps S per arm")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="peak rate of every run (the demo's)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--out", default="outputs/expert_study")
    parser.add_argument("--world", default=None, help="world model dir (default: the committed one)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run (of {', '.join(ARMS)})")
    parser.add_argument("--evaluate_only", action="store_true",
                        help="evaluate the runs already trained under --out (each a finished run of the same S and "
                        "seed, else refused) instead of training them: for a change to the evaluation alone, such "
                        "as a rebuilt evaluation CLIP; the chains' samples are the same (fixed seeds)")
    parser.add_argument("--merge", default=None,
                        help="an earlier results.json (same S and seeds) whose arms not run now join the summary")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=ARM:FLAGS: also run an arm NAME trained as ARM with FLAGS added (a knob per arm)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    try:
        variants = {name: (arm, flags) for name, arm, flags in map(parse_variant, args.variant)}
    except ValueError as error:
        parser.error(str(error))
    seeds = args.seeds or (2 if args.quick else 3)
    steps = args.steps or (40 if args.quick else 800)

    from expertune.config import load_config
    from expertune.data.captioned import write_dataloader_config
    from expertune.demo.run import demo_scenes, pretrained_world
    from expertune.prepare import cache_only
    from expertune.world import PRETRAINED
    from expertune.world.dataset import write_world_dataset

    started = time.perf_counter()
    base, clip = pretrained_world(args.world or PRETRAINED)
    out = Path(args.out).resolve()
    images = write_world_dataset(out / "data", demo_scenes())
    dataloader = write_dataloader_config(out / "dataloader.json", images, out / "cache", 64)
    # One cache for every run: built once here, then only read.
    cache_only(load_config(train_flags(base, out / "cache_run", dataloader, (0, 999), 1, 0, 1e-4))[0], progress=False)
    common = {"steps": steps, "out": str(out), "base": str(base), "clip": str(clip), "dataloader": str(dataloader),
              "learning_rate": args.learning_rate, "evaluate_only": args.evaluate_only}
    tasks = [{**common, "arm": arm, "seed": seed} for seed in range(seeds) for arm in arms]
    tasks += [{**common, "arm": name, "seed": seed, "trains_as": arm, "extra_flags": flags}
              for seed in range(seeds) for name, (arm, flags) in variants.items()]
    environment_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(environment_threads)
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = []
        for result in pool.imap_unordered(run_task, tasks):
            results.append(result)
            print(f"{result['arm']:>12} seed {result['seed']}: eval/loss {result['eval/loss']:.4f} clip "
                  f"{result['clip']:.1f} colours {100 * result['colour/both']:.0f}% ({result['seconds']:.0f} s)",
                  flush=True)
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        if (earlier["steps"], earlier["seeds"]) != (steps, seeds):
            parser.error(f"--merge {args.merge}: S = {earlier['steps']}, {earlier['seeds']} seeds, not {steps}, {seeds}")
        results += [r for r in earlier["results"] if r["arm"] not in arms and r["arm"] not in variants]
    results.sort(key=lambda r: (ARMS.index(r["arm"]) if r["arm"] in ARMS else len(ARMS), r["arm"], r["seed"]))
    summary = summarise(results)
    table = markdown_table(summary, seeds, steps)
    (out / "results.json").write_text(json.dumps({"steps": steps, "seeds": seeds, "results": results,
                                                  "summary": summary,
                                                  "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    (out / "table.md").write_text(table)
    chart(summary, out / "chart.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'chart.png'} in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
