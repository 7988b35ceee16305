"""The GPU suite of issue 25, in one run (under 8 minutes on one H200-class GPU): every figure the issue asks of a GPU.

    python bench/gpu_suite.py                  # one GPU: SSD-1B layout, 1024 px, batch 8, bf16
    python bench/gpu_suite.py --smoke          # any machine, seconds: the tiny layout at 64 px, batch 2, no compile

Prints one JSON line per figure (`part` names it), each with the torch version:
  env        torch / CUDA versions, the device;
  peak       measured matmul peaks: bf16, and float32 with TF32 (TFLOP/s);
  flops      FLOPs of one training sample (forward + backward) of the layout, counted with FlopCounterMode on the
             meta device (SSD-1B: its config in models/layouts.py, no download);
  bare       a bare PyTorch loop (forward, MSE, backward, clip, AdamW, zero_grad) on the layout's UNet with random
             weights and tensors: samples/s and MFU (against the measured bf16 peak), for each variant of
             torch.compile, fused/foreach AdamW and channels_last;
  expertune  `expertune train` (load_config + train, in this process) of a two-expert mixture on generated images,
             eager and with --dynamo_backend=inductor: samples/s and MFU from its metrics.jsonl, and / bare;
  ema        an EMA update of the UNet's parameters: the per-tensor loop against the foreach update, and the CPU EMA;
  checkpoint a synchronous save of the UNet and its AdamW moments with safetensors (seconds, GB);
  offload    one mixture offload switch: the expert's weights, gradients and AdamW state to the host and back;
  generate   the chained generation (both experts) at the training size, 20 steps.
Targets (issue 25): MFU >= 0.35 at bf16 batch 8, expertune / bare >= 0.95, foreach EMA <= 0.25 of the loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ema_update.py's helpers

TORCH = torch.__version__


def emit(part: str, **figures: Any) -> None:
    print(json.dumps({"part": part, **figures, "torch": TORCH}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `work`, the device finished each time."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, tf32: bool = False) -> float:
    """TFLOP/s of a square matmul in `dtype` (float32 with TF32 when `tf32`)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        seconds = timed(device, lambda: torch.mm(a, b), repeats=10, warmup=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * size**3 / seconds / 1e12


def unet_config(smoke: bool) -> dict[str, Any]:
    from expertune.models.layouts import ssd1b_unet_config
    from expertune.models.tiny import tiny_layout

    return dict(tiny_layout().unet) if smoke else ssd1b_unet_config()


def pooled_width(config: dict[str, Any]) -> int:
    """The pooled text embedding's width an SDXL-layout UNet takes (beside its six time ids)."""
    return int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])


def bare_loop(config: dict[str, Any], device: torch.device, side: int, batch: int, steps: int, dtype: torch.dtype,
              compiled: bool, fused: bool, channels_last: bool) -> tuple[float, Any, Any]:
    """Median seconds per step of the bare loop; its UNet and optimizer (for the EMA, checkpoint, offload parts)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).train()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    forward = torch.compile(unet) if compiled else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, **({"fused": True} if fused else {"foreach": True}))
    pooled = pooled_width(config)
    latents = torch.randn(batch, 4, side, side, device=device)
    if channels_last:
        latents = latents.to(memory_format=torch.channels_last)
    text = torch.randn(batch, 77, int(config["cross_attention_dim"]), device=device)
    added = {"text_embeds": torch.randn(batch, pooled, device=device),
             "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch, device=device).float()}
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        noise = torch.randn_like(latents)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = forward(latents + noise, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(device, step, repeats=steps, warmup=3 if compiled else 2), unet, optimizer


def expertune_runs(work: Path, smoke: bool, device: torch.device, side: int, batch: int, steps: int,
                   precision: str, peak: float, compile_variants: list[str]) -> dict[str, float]:
    """Samples/s of `expertune train` (a two-expert mixture job) per dynamo backend; the chained generation."""
    from expertune.config import load_config
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config
    from expertune.infer.generate import generate
    from expertune.models.layouts import ssd1b_layout
    from expertune.models.tiny import build_random_pipeline, tiny_layout
    from expertune.train.loop import train
    from expertune.train.metrics import read_metrics

    pixels = side * 8
    model = build_random_pipeline(work / "model", tiny_layout() if smoke else ssd1b_layout(), seed=0,
                                  device=device.type)
    images = work / "images"
    for index in range(batch * 2):
        shape, colour, background = SHAPES[index % len(SHAPES)]
        save_captioned_image(draw_shape(shape, colour, background, size=pixels), images / f"shape_{index}.png",
                             f"a {colour} {shape} on a {background} background")
    data = write_dataloader_config(work / "dataloader.json", images, work / "cache", pixels)
    results: dict[str, float] = {}
    for backend in compile_variants:
        out = work / f"expertune-{backend}"
        config, _ = load_config([
            f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}", f"--output_dir={out}",
            "--mixture_boundaries=500", f"--resolution={pixels}", f"--train_batch_size={batch}",
            f"--max_train_steps={steps}", "--learning_rate=1e-6", f"--mixed_precision={precision}",
            "--report_to=none", "--validation_disable", "--overwrite_output_dir", f"--dynamo_backend={backend}",
            f"--peak_tflops={peak}", "--vae_batch_size=1", "--timing_breakdown_interval=4"])
        started = time.monotonic()
        train(config)
        rows = read_metrics(out / "metrics.jsonl")
        later = rows[4:] or rows[-1:]  # each expert's first steps warm up (and compile)
        seconds = statistics.median(r["seconds"] for r in later)
        results[backend] = batch / seconds
        parts = {k: round(statistics.median(r[k] for r in later if k in r), 4) for k in
                 ("seconds_data", "seconds_compute", "seconds_optimizer") if any(k in r for r in later)}
        emit("expertune", dynamo_backend=backend, samples_per_s=round(batch / seconds, 3),
             mfu=round(statistics.median(r.get("mfu", 0.0) for r in later), 4), step_s=round(seconds, 4),
             steps=len(rows), total_s=round(time.monotonic() - started, 1), **parts)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    started = time.monotonic()
    from expertune.infer.chain import mixture_expert_paths

    image = generate(mixture_expert_paths(work / f"expertune-{compile_variants[0]}"), "a red circle on a blue background",
                     num_inference_steps=4 if smoke else 20, guidance_scale=5.0, height=pixels, width=pixels,
                     device=device.type)
    emit("generate", seconds=round(time.monotonic() - started, 2), size=list(image.size),
         steps=4 if smoke else 20, note="both experts loaded from disk, chained")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny layout at 64 px, batch 2, no compile: seconds")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 10, smoke 2)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        parser.error("no CUDA device here: run with --smoke (the full suite needs one GPU)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    side, batch = (8, 2) if smoke else (128, 8)
    steps = args.steps or (2 if smoke else 10)
    precision, dtype = ("no", torch.float32) if smoke and device.type == "cpu" else ("bf16", torch.bfloat16)
    emit("env", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         cuda=torch.version.cuda, smoke=smoke, pixels=side * 8, batch=batch, precision=precision)

    size = 256 if smoke else 8192
    bf16 = matmul_peak(device, torch.bfloat16, size)
    tf32 = matmul_peak(device, torch.float32, size, tf32=True)
    emit("peak", bf16_tflops=round(bf16, 2), tf32_tflops=round(tf32, 2), matmul_size=size)
    peak = bf16 if dtype == torch.bfloat16 else tf32

    from expertune.train.timing import known_peak_tflops, training_flops

    config = unet_config(smoke)
    flops = training_flops(config, (4, side, side), 77, pooled_width(config))
    datasheet = known_peak_tflops(device, precision, False)
    emit("flops", layout="tiny" if smoke else "ssd-1b", pixels=side * 8, training_flops_per_sample=flops,
         tflop_per_sample=round(flops / 1e12, 4), datasheet_peak_tflops=datasheet)

    variants = [(False, False, False), (False, True, False), (False, True, True)]
    if not smoke:
        variants += [(True, True, False), (True, True, True)]
    bare: dict[tuple[bool, bool, bool], float] = {}
    kept: tuple[Any, Any] | None = None
    for compiled, fused, channels_last in variants:
        if fused and device.type != "cuda":
            fused = False  # fused AdamW is the CUDA kernel here; the CPU runs foreach
        seconds, unet, optimizer = bare_loop(config, device, side, batch, steps, dtype, compiled, fused, channels_last)
        rate = batch / seconds
        bare[(compiled, fused, channels_last)] = rate
        emit("bare", compiled=compiled, fused_adamw=fused, channels_last=channels_last, samples_per_s=round(rate, 3),
             mfu=round(flops * rate / (peak * 1e12), 4), step_s=round(seconds, 4))
        if kept is None:
            kept = (unet, optimizer)
        else:
            del unet, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    assert kept is not None
    unet, optimizer = kept
    costs(unet, optimizer, device, work, smoke)
    del unet, optimizer, kept
    if device.type == "cuda":
        torch.cuda.empty_cache()

    backends = ["no"] if smoke else ["no", "inductor"]
    ours = expertune_runs(work, smoke, device, side, batch, max(steps, 6), precision, peak, backends)
    eager_bare = bare[(False, device.type == "cuda", False)]
    emit("ratio", expertune_over_bare=round(ours["no"] / eager_bare, 3),
         note="expertune eager (AdamW fused on CUDA) against the bare eager loop with the same AdamW kernel")
    return 0


def costs(unet: Any, optimizer: Any, device: torch.device, work: Path, smoke: bool) -> None:
    """EMA update, synchronous checkpoint and offload switch, on the bare loop's trained UNet and AdamW."""
    from safetensors.torch import save_file

    from ema_update import loop_update  # bench/ema_update.py
    from expertune.train.ema import ExponentialMovingAverage
    from expertune.train.offload import move_training_state

    params = [p for p in unet.parameters() if p.requires_grad]
    ema = ExponentialMovingAverage(params, 0.999, device)
    reference = [s.clone() for s in ema.shadow]
    repeats = 5 if smoke else 10
    loop = timed(device, lambda: loop_update(reference, params, 0.9, device), repeats)
    foreach = timed(device, lambda: ema.update(params), repeats)
    del reference, ema
    host = ExponentialMovingAverage(params, 0.999, "cpu")
    host_s = timed(device, lambda: host.update(params), 3)
    del host
    emit("ema", tensors=len(params), loop_s=round(loop, 5), foreach_s=round(foreach, 5),
         foreach_over_loop=round(foreach / loop, 3), cpu_ema_s=round(host_s, 4))

    folder = work / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(folder / "unet.safetensors"))
        moments = {f"{i}.{key}": value for i, s in enumerate(optimizer.state.values())
                   for key, value in s.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
        save_file(moments, str(folder / "optimizer.safetensors"))

    checkpoint = timed(device, save, 1, warmup=0)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
    emit("checkpoint", seconds=round(checkpoint, 2), gigabytes=round(size, 2), note="synchronous, safetensors")

    def switch() -> None:
        move_training_state(unet, optimizer, "cpu")
        move_training_state(unet, optimizer, device)

    emit("offload", switch_s=round(timed(device, switch, 1, warmup=0), 3),
         note="one expert's weights, gradients and AdamW state to the host and back")


if __name__ == "__main__":
    sys.exit(main())
