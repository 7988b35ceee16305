"""Memory and step time of LoRA training over an int8 base (`base_model_precision=int8-torchao`) against a bf16 and
a float32 base, in one run.

Each variant runs in a fresh subprocess on the same model, adapters and batches (seeded): the model is built, its
base cast to bfloat16 or quantised to int8 (torchao's weight-only int8, what expertune applies to the UNet's
Linear layers), LoRA adapters (rank 16) added on every Linear, then `--steps` AdamW steps on the adapters.
Memory: the resident set after setup (the held weights) and its peak during the steps, sampled every 2 ms by a
thread, both over the resident set before the model was built, with MALLOC_MMAP_THRESHOLD_=65536 so that freed
blocks leave the resident set (see bench/fused_backward.py); on CUDA `torch.cuda.memory_allocated` /
`max_memory_allocated`. The model is a stack of square Linear layers (`--layers`, `--width`), or the UNet of
`--unet DIR`. On this CPU bfloat16 matmuls are slow (no native kernel), so the bf16 step time says little.

    python bench/quantized_base.py                     # 16 x Linear(2048, 2048): 67M parameters
    python bench/quantized_base.py --unet /path/to/model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

VARIANTS = ("fp32", "bf16", "int8-torchao")


def _rss() -> int:
    import resource

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _worker(args: argparse.Namespace) -> None:
    from peft import LoraConfig

    from expertune.models.quantize import quantize_frozen_base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = torch.cuda.memory_allocated() if device == "cuda" else _rss()
    torch.manual_seed(0)
    if args.unet:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(args.unet, subfolder="unet")
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
        cfg = model.config

        def batch(g: torch.Generator) -> dict:
            size = args.latent
            return dict(sample=torch.randn(args.batch, cfg.in_channels, size, size, generator=g),
                        timestep=torch.full((args.batch,), 500),
                        encoder_hidden_states=torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g),
                        added_cond_kwargs={"text_embeds": torch.randn(
                            args.batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                            generator=g), "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]]
                                                                   * args.batch, dtype=torch.float32)})

        def forward(inputs: dict) -> torch.Tensor:
            return model(**inputs).sample
    else:
        model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
        targets = [str(i) for i in range(args.layers)]

        def batch(g: torch.Generator) -> dict:
            return {"x": torch.randn(args.batch, args.width, generator=g)}

        def forward(inputs: dict) -> torch.Tensor:
            return model(inputs["x"])
    model.requires_grad_(False)
    compute = torch.bfloat16 if args.variant == "bf16" else torch.float32
    if args.variant == "bf16":
        model.to(torch.bfloat16)
    elif args.variant == "int8-torchao":
        quantize_frozen_base(model, "int8-torchao")
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets), model)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start
        torch.cuda.reset_peak_memory_stats()
    else:
        held = _rss() - start
    peak = [0]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    if device == "cpu":
        sampler.start()
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(args.steps):
        inputs = batch(g)
        inputs = {k: (v.to(device, compute) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inputs.items()}
        began = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.variant == "bf16"):
            loss = forward(inputs).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    running[0] = False
    if device == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated() - start
    else:
        sampler.join()
        peak_bytes = max(peak[0], _rss()) - start
    print(json.dumps({"variant": args.variant, "device": device, "held": held, "peak": peak_bytes,
                      "step_seconds": min(times[1:] or times), "trainable": sum(p.numel() for p in params)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _worker(args)
        return
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    for variant in VARIANTS:
        argv = [sys.executable, __file__, "--variant", variant, "--layers", str(args.layers), "--width",
                str(args.width), "--batch", str(args.batch), "--latent", str(args.latent), "--steps", str(args.steps)]
        if args.unet:
            argv += ["--unet", args.unet]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    gib = 1024 ** 3
    print(f"model: {'UNet of ' + args.unet if args.unet else f'{args.layers} x Linear({args.width})'}, LoRA rank 16 "
          f"({results['fp32']['trainable'] / 1e6:.2f}M trainable), {args.steps} AdamW steps on "
          f"{results['fp32']['device']}")
    for variant, r in results.items():
        print(f"  {variant:13s}: held +{r['held'] / gib:.3f} GiB, peak +{r['peak'] / gib:.3f} GiB, "
              f"{r['step_seconds']:.3f} s/step")
    base = results["bf16"]
    q = results["int8-torchao"]
    print(f"int8-torchao / bf16: held {q['held'] / base['held']:.3f}, peak {q['peak'] / base['peak']:.3f}, "
          f"step time {q['step_seconds'] / base['step_seconds']:.3f}")


if __name__ == "__main__":
    main()
