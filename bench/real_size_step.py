"""Real-size check: train SDXL-family experts of the real size through expertune's own code path.

Builds an SSD-1B-layout pipeline (or SDXL, or tiny) from its config — random weights, no download —
and a small generated dataset, then runs `expertune train` exactly as a user would (the recipe's
flags, `load_config` + `train`), and prints seconds per step and peak memory as JSON lines.
With --chain it also trains stage 2 and chains both experts with `expertune generate`'s code; with
--stage2_layout sdxl_refiner stage 2 starts from a refiner-layout model (the SDXL refiner's architecture,
sharing stage 1's VAE and text encoder 2), the issue's "SSD-1B base with the SDXL refiner as the low-noise expert".

    python bench/real_size_step.py --layout ssd1b --resolution 512 --steps 2 --optimizer adafactor   # CPU, 24 GiB
    python bench/real_size_step.py --layout ssd1b --resolution 1024 --steps 10 --chain    # one GPU
    python bench/real_size_step.py --layout ssd1b --stage2_layout sdxl_refiner --resolution 1024 --steps 10 --chain
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from expertune.config import load_config
from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config
from expertune.infer.chain import generate
from expertune.models.layouts import sdxl_layout, sdxl_refiner_layout, ssd1b_layout
from expertune.models.tiny import build_random_pipeline, tiny_layout, tiny_refiner_layout
from expertune.train.metrics import read_metrics
from expertune.train.loop import train

LAYOUTS = {"ssd1b": ssd1b_layout, "sdxl": sdxl_layout, "tiny": tiny_layout}
REFINER_LAYOUTS = {"sdxl_refiner": sdxl_refiner_layout, "tiny_refiner": tiny_refiner_layout}


def emit(**figures) -> None:
    print(json.dumps(figures), flush=True)


def stage_flags(stage: int, args: argparse.Namespace, model: Path, data: Path, out: Path) -> list[str]:
    band = ["--refiner_training", "--refiner_training_strength=0.35"]
    if stage == 1:
        band.append("--refiner_training_invert_schedule")
    flags = [
        f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}", f"--output_dir={out}",
        *band, "--prediction_type=v_prediction", "--rescale_betas_zero_snr",
        "--training_scheduler_timestep_spacing=trailing", f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch_size}", f"--max_train_steps={args.steps}", "--learning_rate=1e-6",
        f"--mixed_precision={args.mixed_precision}", "--report_to=none", "--overwrite_output_dir",
        f"--optimizer={args.optimizer}",
        "--vae_batch_size=1",
    ]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if args.validate:
        flags += ["--validation_num_inference_steps=20", "--validation_prompt=a red circle on a blue background"]
    else:
        flags.append("--validation_disable")
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="ssd1b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--optimizer", default="adamw",
                        help="adafactor fits a real-size full fine-tune in 24 GiB of host memory; fp32 AdamW needs ~21 GiB "
                             "for weights, gradients and moments alone")
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--validate", action="store_true", help="make validation images at the end")
    parser.add_argument("--chain", action="store_true", help="also train stage 2 and chain the two experts")
    parser.add_argument("--stage2_layout", choices=["same", *sorted(REFINER_LAYOUTS)], default="same",
                        help="stage 2's model: the same as stage 1, or a refiner-layout model sharing its VAE and "
                             "text encoder 2")
    parser.add_argument("--work", default="outputs/real_size")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emit(event="start", device=torch.cuda.get_device_name() if device == "cuda" else "cpu", layout=args.layout,
         resolution=args.resolution, batch_size=args.batch_size, optimizer=args.optimizer, torch=torch.__version__)

    started = time.monotonic()
    model = build_random_pipeline(work / f"model-{args.layout}", LAYOUTS[args.layout](), seed=0, device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
    emit(event="model_built", seconds=round(time.monotonic() - started, 1))

    stage2_model = model
    if args.stage2_layout != "same":
        stage2_model = build_random_pipeline(work / f"model-{args.stage2_layout}", REFINER_LAYOUTS[args.stage2_layout](),
                                             seed=1, device=device, vae_from=model, text_encoder_from=model)
        emit(event="refiner_built", seconds=round(time.monotonic() - started, 1))

    images = work / "images"
    for index in range(args.images):
        shape, colour, background = SHAPES[index % len(SHAPES)]
        save_captioned_image(draw_shape(shape, colour, background, size=args.resolution), images / f"shape_{index}.png",
              f"a {colour} {shape} on a {background} background")
    data = write_dataloader_config(work / "dataloader.json", images, work / "cache", args.resolution)

    stages = (1, 2) if args.chain else (1,)
    outputs = []
    for stage in stages:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = work / f"stage{stage}"
        config, _ = load_config(stage_flags(stage, args, model if stage == 1 else stage2_model, data, out))
        result = train(config)
        steps = [r["seconds"] for r in read_metrics(out / "metrics.jsonl")]
        summary = result.summary
        emit(event="trained", stage=stage, band=summary["expert"]["timestep_range"],
             unet_parameters_m=round(_unet_parameter_count(result.pipeline_dir) / 1e6, 1),
             first_step_s=steps[0], later_step_s=round(statistics.median(steps[1:]), 3) if len(steps) > 1 else None,
             samples_per_s=round(args.batch_size / statistics.median(steps[1:]), 3) if len(steps) > 1 else None,
             to_first_step_s=summary["seconds"]["to_first_step"], total_s=summary["seconds"]["total"],
             peak_memory_gib=summary["peak_memory_gib"], cache=summary["cache"], final_loss=summary["final"]["loss"])
        outputs.append(out)

    if args.chain:
        started = time.monotonic()
        image = generate(outputs, "a red circle on a blue background", num_inference_steps=20, guidance_scale=5.0,
                         guidance_rescale=0.7, height=args.resolution, width=args.resolution, device=device)
        emit(event="chained", seconds=round(time.monotonic() - started, 2), size=list(image.size))
    return 0


def _unet_parameter_count(pipeline_dir: Path) -> int:
    from math import prod

    from safetensors import safe_open

    count = 0
    for file in sorted((pipeline_dir / "unet").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            count += sum(prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return count


if __name__ == "__main__":
    sys.exit(main())
