"""Training-speed benchmark: `expertune train` against a bare PyTorch loop on the same UNet and tensors.

For each model (the tiny one, and a 68M-parameter SDXL-layout UNet) it runs, one after the other and alone:
  1. `expertune train` as a user would (a subprocess, warm caches): samples/s after warm-up, time from command
     start to the first optimizer step, peak RSS;
  2. a bare loop in a fresh subprocess: the same UNet, the same cached latents and embeddings held in memory,
     forward + v-target MSE + backward + clip + AdamW step, nothing else: samples/s and peak RSS;
and prints the ratios, plus the achieved FLOP/s of a step (counted by torch's FlopCounterMode) as a fraction of
this machine's fp32 matmul peak (2048² products, measured in the same run).

    python bench/train_step.py                       # both models, ~3-5 minutes on 2 CPU cores
    python bench/train_step.py --models tiny --steps 30
Run it alone: another CPU-heavy process beside it distorts every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": 128, "small": 256}  # layout → training resolution


def emit(**figures) -> None:
    print(json.dumps(figures), flush=True)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def prepare(work: Path, layout: str, images: int) -> tuple[Path, Path]:
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config
    from expertune.models.tiny import build_random_pipeline, small_layout, tiny_layout

    resolution = MODELS[layout]
    model = work / f"model-{layout}"
    if not (model / "model_index.json").exists():
        build_random_pipeline(model, tiny_layout() if layout == "tiny" else small_layout(), seed=0)
    folder = work / f"images-{resolution}"
    for index in range(images):
        shape, colour, background = SHAPES[index % len(SHAPES)]
        path = folder / f"shape_{index:03d}.png"
        if not path.exists():
            save_captioned_image(draw_shape(shape, colour, background, size=resolution), path,
                                 f"a {colour} {shape} on a {background} background, number {index}")
    data = write_dataloader_config(work / f"dataloader-{layout}.json", folder, work / "cache", resolution)
    return model, data


def train_flags(model: Path, data: Path, out: Path, layout: str, steps: int, batch: int) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}", f"--output_dir={out}",
            "--refiner_training", "--refiner_training_strength=0.35", "--refiner_training_invert_schedule",
            "--prediction_type=v_prediction", "--rescale_betas_zero_snr", f"--resolution={MODELS[layout]}",
            f"--train_batch_size={batch}", f"--max_train_steps={steps}", "--learning_rate=1e-5",
            "--report_to=none", "--validation_disable", "--overwrite_output_dir"]


def run_expertune(model: Path, data: Path, work: Path, layout: str, steps: int, batch: int) -> dict:
    out = work / f"run-{layout}"
    shutil.rmtree(out, ignore_errors=True)  # so the first metrics line seen is this run's
    command = [sys.executable, "-m", "expertune.cli", "train", *train_flags(model, data, out, layout, steps, batch)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics, first_step = out / "metrics.jsonl", None
    while process.poll() is None:
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = time.monotonic() - started
        time.sleep(0.005)
    if process.returncode != 0:
        raise SystemExit(f"expertune train failed:\n{process.stderr.read()}")
    summary = json.loads((out / "run.json").read_text())
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
    return {"step_s": statistics.median(seconds[3:] or seconds), "command_to_first_step_s": round(first_step or 0, 2),
            "peak_rss_gib": summary["peak_memory_gib"]["host_rss"], "cache": summary["cache"]}


def bare_loop(model: Path, data: Path, layout: str, steps: int, batch: int) -> dict:
    """Forward, loss, backward, clip, AdamW step of the same UNet on the cached tensors — nothing else."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from expertune.config import config_from_mapping
    from expertune.models.sdxl import load_components
    from expertune.schedule import NoiseSchedule, add_noise, training_target
    from expertune.prepare import prepare_data

    config = config_from_mapping({"data_backend_config": str(data), "resolution": MODELS[layout]})
    components = load_components(str(model))
    prepared = prepare_data(config, components)  # warm: only reads the cache
    tensors = [prepared.latent_cache.load(i.record, i.spec) + prepared.embed_cache.load(i.captions[0])
               for i in prepared.items]
    del components, prepared
    latents = torch.stack([t[0] for t in tensors])
    time_ids = torch.stack([t[1] for t in tensors]).float()
    embeds = torch.stack([t[2] for t in tensors])
    pooled = torch.stack([t[3] for t in tensors])
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet").train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    generator = torch.Generator().manual_seed(0)

    def step(count_flops: bool = False) -> float:
        pick = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[pick]
        t = torch.randint(350, 1000, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = add_noise(x0, noise, t, schedule.alphas_cumprod)
        target = training_target(x0, noise, t, schedule.alphas_cumprod, "v_prediction")
        started = time.perf_counter()
        counter = FlopCounterMode(display=False) if count_flops else None
        with counter if counter else torch.enable_grad():
            prediction = unet(noisy, t, encoder_hidden_states=embeds[pick],
                              added_cond_kwargs={"text_embeds": pooled[pick], "time_ids": time_ids[pick]}).sample
            loss = torch.nn.functional.mse_loss(prediction, target)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        return counter.get_total_flops() if counter else elapsed

    flops = step(count_flops=True)
    seconds = [step() for _ in range(steps)]
    return {"step_s": statistics.median(seconds[3:]), "flops_per_step": flops,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--work", default="outputs/bench_train_step")
    parser.add_argument("--bare", nargs=3, metavar=("MODEL", "DATA", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        model, data, layout = args.bare
        print(json.dumps(bare_loop(Path(model), Path(data), layout, args.steps, args.batch_size)))
        return 0

    work = Path(args.work).resolve()
    peak = matmul_peak_gflops()
    emit(event="machine", fp32_matmul_peak_gflops=round(peak, 1), threads=torch.get_num_threads())
    for layout in args.models:
        model, data = prepare(work, layout, args.images)
        run_expertune(model, data, work, layout, 2, args.batch_size)  # builds the caches: later runs are warm
        ours = run_expertune(model, data, work, layout, args.steps, args.batch_size)
        bare = json.loads(subprocess.run(
            [sys.executable, __file__, "--bare", str(model), str(data), layout, "--steps", str(args.steps),
             "--batch_size", str(args.batch_size)], capture_output=True, text=True, check=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1")).stdout.strip().splitlines()[-1])
        from diffusers import UNet2DConditionModel

        parameters = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(str(model), subfolder="unet").parameters())
        achieved = bare["flops_per_step"] / ours["step_s"] / 1e9
        emit(event="result", model=layout, unet_parameters_m=round(parameters / 1e6, 1), resolution=MODELS[layout],
             batch_size=args.batch_size,
             expertune_samples_per_s=round(args.batch_size / ours["step_s"], 2),
             bare_samples_per_s=round(args.batch_size / bare["step_s"], 2),
             speed_ratio=round(bare["step_s"] / ours["step_s"], 3),
             achieved_gflops=round(achieved, 2), fraction_of_matmul_peak=round(achieved / peak, 3),
             expertune_peak_rss_gib=ours["peak_rss_gib"], bare_peak_rss_gib=bare["peak_rss_gib"],
             rss_ratio=round(ours["peak_rss_gib"] / bare["peak_rss_gib"], 3),
             command_to_first_step_s=ours["command_to_first_step_s"], warm_cache=ours["cache"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
