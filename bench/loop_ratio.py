"""expertune's training loop against a bare PyTorch loop doing the same periodic work, side by side in one run
(issue 25, item 5): the tiny SDXL-layout UNet, warm caches, EMA every step, a checkpoint every 50 steps and the
held-out loss every 50 steps.

  expertune  `expertune train` in a subprocess as a user runs it: --use_ema, --checkpoint_step_interval=50,
             --eval_holdout_fraction with --validation_step_interval=50 (each validation also makes its default
             images, dataset captions, at one sampler step: work the bare loop does not do), batches read from the
             caches (prefetched);
  bare       a fresh subprocess: the same UNet, the same cached tensors held in memory, forward + v-target MSE +
             backward + clip + AdamW + foreach EMA; every 50 steps the UNet, the EMA and the AdamW moments written
             with safetensors, and the held-out loss of as many images at the same fixed timesteps.

Each side's time is the wall time from the end of its first step to the end of its last (steps 2..N, so the
periodic work at steps 50, 100, 150 is inside), read from metrics.jsonl's lines as they appear (expertune) and
from the loop's clock (bare). ratio = bare seconds / expertune seconds (target >= 0.95).

    python bench/loop_ratio.py                 # 151 steps of batch 4 at 128 px: ~3-5 minutes on 2 CPU cores
Run it alone: another CPU-heavy process beside it distorts the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import MODELS, prepare  # noqa: E402  (bench/train_step.py: model and images)

HOLDOUT = 0.125
EVERY = 50


def expertune_seconds(model: Path, data: Path, work: Path, steps: int, batch: int) -> dict:
    out = work / "run-expertune"
    command = [sys.executable, "-m", "expertune.cli", "train", f"--pretrained_model_name_or_path={model}",
               f"--data_backend_config={data}", f"--output_dir={out}", "--overwrite_output_dir",
               "--refiner_training", "--refiner_training_strength=0.35", "--refiner_training_invert_schedule",
               "--prediction_type=v_prediction", "--rescale_betas_zero_snr", f"--resolution={MODELS['tiny']}",
               f"--train_batch_size={batch}", f"--max_train_steps={steps}", "--learning_rate=1e-5",
               "--report_to=none", "--use_ema", f"--checkpoint_step_interval={EVERY}",
               f"--eval_holdout_fraction={HOLDOUT}", f"--validation_step_interval={EVERY}",
               "--validation_num_inference_steps=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    metrics, seen, first, last = out / "metrics.jsonl", 0, None, None
    while process.poll() is None:
        if metrics.exists():
            train = [x for x in metrics.read_text().splitlines() if x.endswith("}") and '"kind"' not in x]
            if len(train) > seen:
                seen = len(train)
                now = time.monotonic()
                first = first if first is not None else now
                if seen >= steps and last is None:
                    last = now
        time.sleep(0.002)
    if process.returncode != 0:
        raise SystemExit(f"expertune train failed:\n{process.stderr.read()[-4000:]}")
    assert first is not None and last is not None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    validations = [r for r in rows if r.get("kind") == "validation"]
    return {"seconds": last - first, "checkpoints": len(list((out / "checkpoints").iterdir())),
            "validations_with_eval_loss": sum("eval/loss" in r for r in validations)}


def bare_seconds(model: Path, data: Path, work: Path, steps: int, batch: int) -> dict:
    """The bare loop (run in a fresh subprocess by `main`)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from expertune.config import config_from_mapping
    from expertune.prepare import prepare_data
    from expertune.models.sdxl import load_components
    from expertune.schedule import NoiseSchedule, add_noise, training_target

    config = config_from_mapping({"data_backend_config": str(data), "resolution": MODELS["tiny"]})
    components = load_components(str(model))
    prepared = prepare_data(config, components)  # warm: only reads the cache
    tensors = [prepared.latent_cache.load(i.record, i.spec) + prepared.embed_cache.load(i.captions[0])
               for i in prepared.items]
    del components, prepared
    held = max(1, round(len(tensors) * HOLDOUT))
    latents, time_ids, embeds, pooled = (torch.stack([t[k] for t in tensors]).float() for k in range(4))
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet").train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    shadow = [p.detach().clone() for p in params]
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    generator = torch.Generator().manual_seed(0)
    eval_t = torch.tensor([400, 550, 700, 850]).repeat_interleave(4)  # 4 sub-bands x 4 fixed timesteps
    eval_noise = torch.randn((held, len(eval_t), *latents.shape[1:]), generator=generator)
    folder = work / "bare-checkpoints"
    folder.mkdir(parents=True, exist_ok=True)

    def loss_of(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        noisy = add_noise(x0, noise, t, schedule.alphas_cumprod)
        prediction = unet(noisy, t, encoder_hidden_states=embeds[pick],
                          added_cond_kwargs={"text_embeds": pooled[pick], "time_ids": time_ids[pick]}).sample
        return torch.nn.functional.mse_loss(prediction, training_target(x0, noise, t, schedule.alphas_cumprod,
                                                                        "v_prediction"))

    first = None
    for step in range(1, steps + 1):
        pick = torch.randint(held, len(latents), (batch,), generator=generator)
        t = torch.randint(350, 1000, (batch,), generator=generator)
        loss_of(latents[pick], torch.randn(latents[pick].shape, generator=generator), t, pick).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - min(0.9999, (1 + step) / (10 + step)))
        if step % EVERY == 0:
            names = [n for n, p in unet.named_parameters() if p.requires_grad]
            save_file({n: p.detach().contiguous() for n, p in zip(names, params)}, str(folder / "unet.safetensors"))
            save_file(dict(zip(names, shadow)), str(folder / "ema.safetensors"))
            save_file({f"{i}.{k}": v for i, s in enumerate(optimizer.state.values()) for k, v in s.items()
                       if v.dim() > 0}, str(folder / "optimizer.safetensors"))
            unet.eval()
            with torch.no_grad():
                for index in range(held):
                    pick = torch.full((len(eval_t),), index)
                    float(loss_of(latents[pick], eval_noise[index], eval_t, pick))
            unet.train()
        if step == 1:
            first = time.monotonic()
    assert first is not None
    return {"seconds": time.monotonic() - first, "held_out_images": held}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=151)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--work", default="outputs/bench_loop_ratio")
    parser.add_argument("--bare", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    if args.bare:
        print(json.dumps(bare_seconds(Path(args.bare[0]), Path(args.bare[1]), work, args.steps, args.batch_size)))
        return 0
    model, data = prepare(work, "tiny", args.images)
    expertune_seconds(model, data, work, 2, args.batch_size)  # builds the caches: the measured runs are warm
    ours = expertune_seconds(model, data, work, args.steps, args.batch_size)
    bare = json.loads(subprocess.run(
        [sys.executable, __file__, "--bare", str(model), str(data), "--steps", str(args.steps), "--batch_size",
         str(args.batch_size), "--work", str(work)], capture_output=True, text=True, check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1")).stdout.strip().splitlines()[-1])
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "resolution": MODELS["tiny"],
                      "expertune_s": round(ours["seconds"], 2), "bare_s": round(bare["seconds"], 2),
                      "ratio_bare_over_expertune": round(bare["seconds"] / ours["seconds"], 3),
                      "expertune_checkpoints": ours["checkpoints"],
                      "expertune_validations_with_eval_loss": ours["validations_with_eval_loss"],
                      "bare_held_out_images": bare["held_out_images"], "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "load_average": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
