"""A joint mixture job against separate jobs on the same work: wall time, peak memory, and the same experts.

On the committed world model (64 px, batch 8, v-prediction with zero-terminal SNR) and the demo's fine-tuning
set, with caches built beforehand (both sides read them, neither encodes), the same total of S optimizer
steps is spent three ways, one after another, each job a process of its own on one thread:

  separate   two `expertune train` jobs, [350, 999] for 0.65 S steps and [0, 349] for 0.35 S
  joint      one job, `--mixture_boundaries 350 --mixture_schedule proportional`: the same two experts
  joint3     one job of three experts, `--mixture_boundaries 700,350` (how memory grows with N)

It prints each side's wall seconds and peak resident memory (the largest of its processes), the ratios
joint / separate, and whether the joint job's experts equal the separate jobs' bit for bit (they should:
each expert keeps its own data and random streams, seeded as a job of its own).

    .venv/bin/python bench/mixture_joint.py             # S = 200: about 3 minutes on 2 cores, run alone
    .venv/bin/python bench/mixture_joint.py --steps 40  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def flags(model: Path, dataloader: Path, output: Path, which: list[str], steps: int) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--data_backend_config={dataloader}",
            f"--output_dir={output}", *which, "--prediction_type=v_prediction", "--rescale_betas_zero_snr",
            "--resolution=64", "--train_batch_size=8", f"--max_train_steps={steps}", "--learning_rate=3e-4",
            "--lr_scheduler=constant", "--validation_disable", "--report_to=none", "--overwrite_output_dir"]


def timed_job(argv: list[str]) -> tuple[float, float]:
    """Run `expertune train ARGV` in a process of one thread: (wall seconds, peak RSS in MiB)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "expertune.cli", "train", *argv], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"expertune train {' '.join(argv)} failed:\n{process.stderr.read() if process.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="total optimizer steps S of each side")
    parser.add_argument("--out", default="outputs/mixture_joint")
    args = parser.parse_args(argv)

    from expertune.config import load_config
    from expertune.prepare import cache_only
    from expertune.data.captioned import write_dataloader_config
    from expertune.demo.run import demo_scenes, pretrained_world
    from expertune.world import PRETRAINED
    from expertune.world.dataset import write_world_dataset

    out = Path(args.out).resolve()
    base, _ = pretrained_world(PRETRAINED)
    images = write_world_dataset(out / "data", demo_scenes())
    dataloader = write_dataloader_config(out / "dataloader.json", images, out / "cache", 64)
    cache_only(load_config(flags(base, dataloader, out / "cache_run", [], 1))[0], progress=False)

    high = round(args.steps * 0.65)
    separate = [timed_job(flags(base, dataloader, out / "stage1", ["--timestep_range=350,999"], high)),
                timed_job(flags(base, dataloader, out / "stage2", ["--timestep_range=0,349"], args.steps - high))]
    joint = timed_job(flags(base, dataloader, out / "joint", ["--mixture_boundaries=350",
                                                             "--mixture_schedule=proportional"], args.steps))
    joint3 = timed_job(flags(base, dataloader, out / "joint3", ["--mixture_boundaries=700,350",
                                                               "--mixture_schedule=proportional"], args.steps))
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    identical = all(same_weights(out / "joint" / f"expert-{k}" / "pipeline" / weights, out / stage / "pipeline" / weights)
                    for k, stage in enumerate(("stage1", "stage2")))
    rows = {
        "separate": {"seconds": sum(s for s, _ in separate), "peak_rss_mib": max(m for _, m in separate)},
        "joint": {"seconds": joint[0], "peak_rss_mib": joint[1]},
        "joint3": {"seconds": joint3[0], "peak_rss_mib": joint3[1]},
    }
    ratios = {"joint/separate seconds": rows["joint"]["seconds"] / rows["separate"]["seconds"],
              "joint/separate peak memory": rows["joint"]["peak_rss_mib"] / rows["separate"]["peak_rss_mib"],
              "joint3/joint peak memory": rows["joint3"]["peak_rss_mib"] / rows["joint"]["peak_rss_mib"]}
    print(f"S = {args.steps} steps of batch 8 at 64 px on the world model, one thread per job")
    for name, row in rows.items():
        print(f"  {name:>9}: {row['seconds']:7.1f} s, peak RSS {row['peak_rss_mib']:7.1f} MiB")
    for name, value in ratios.items():
        print(f"  {name}: {value:.3f}")
    print(f"  joint experts identical to the separate jobs' experts: {identical}")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows, "ratios": ratios,
                                                  "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
