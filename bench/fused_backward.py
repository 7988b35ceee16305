"""Peak memory and step time of the optimizer step in backward (`optimizer_release_gradients`) against the usual step.

Each variant runs in a fresh subprocess, one after the other, on the same model and batches (seeded):
  - usual: forward, backward (every gradient kept), AdamW step over all parameters, zero_grad;
  - fused: forward, backward with each parameter stepped by its own AdamW as its gradient completes and the
    gradient freed at once (expertune.train.fused.StepInBackward), no step after.
Memory: on a CUDA GPU `torch.cuda.max_memory_allocated` minus the memory held before the first step (weights,
inputs); on the CPU the process's peak resident set (`resource.getrusage(...).ru_maxrss`, what the kernel saw)
minus the resident set before the first step, with glibc told to map every block over 64 KiB on its own
(MALLOC_MMAP_THRESHOLD_=65536, both variants): a freed gradient then leaves the resident set at once, as it leaves
a CUDA allocator's pool for reuse. Without it glibc keeps freed 16 MiB blocks in its heap and the RSS shows
almost no difference (0.96 measured) although the live tensors do (tracemalloc does not see torch's CPU
allocations, hence the RSS). That setting slows both variants' allocations; read the step-time ratio with care. The model is parameter-heavy (a stack of
square Linear layers, or the SDXL-layout UNet of `--unet DIR`), so the gradients are a large share of the memory
the way they are in a full SDXL fine-tune. It also checks that both variants end with the same weights.

    python bench/fused_backward.py                      # 16 x Linear(2048, 2048) = 67M parameters, 3 steps
    python bench/fused_backward.py --unet /path/to/model --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    if args.unet:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.unet, subfolder="unet").train()
        size = args.latent

        def loss(model: torch.nn.Module, g: torch.Generator, device: str) -> torch.Tensor:
            cfg = model.config
            x = torch.randn(args.batch, cfg.in_channels, size, size, generator=g).to(device)
            embeds = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(device)
            pooled = torch.randn(args.batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                 generator=g).to(device)
            ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * args.batch, dtype=torch.float32)
            out = model(x, torch.full((args.batch,), 500, device=device), encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.to(device)}).sample
            return out.float().pow(2).mean()

        return unet, loss
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    mlp = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.GELU())])

    def mlp_loss(model: torch.nn.Module, g: torch.Generator, device: str) -> torch.Tensor:
        x = torch.randn(args.batch, args.width, generator=g).to(device)
        return model(x).pow(2).mean()

    return mlp, mlp_loss


def _worker(args: argparse.Namespace) -> None:
    from expertune.train.fused import StepInBackward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, loss_fn = _model(args)
    model.to(device)
    make = lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)  # noqa: E731
    optimizer = StepInBackward(model.parameters(), make) if args.variant == "fused" else make(model.parameters())
    g = torch.Generator().manual_seed(1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_now()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss_fn(model, g, device).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        how = "peak RSS (ru_maxrss)"
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"variant": args.variant, "device": device, "peak_bytes": peak, "how": how,
                      "step_seconds": min(times[1:] or times), "checksum": checksum, "parameters": params}))


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", help="a diffusers model folder: benchmark its UNet instead of the Linear stack")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent edge with --unet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=("usual", "fused"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _worker(args)
        return
    results = {}
    for variant in ("usual", "fused"):
        argv = [sys.executable, __file__, "--variant", variant, "--layers", str(args.layers), "--width",
                str(args.width), "--batch", str(args.batch), "--latent", str(args.latent), "--steps", str(args.steps)]
        if args.unet:
            argv += ["--unet", args.unet]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
        output = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    usual, fused = results["usual"], results["fused"]
    gib = 1024 ** 3
    print(f"model: {'UNet of ' + args.unet if args.unet else f'{args.layers} x Linear({args.width})'}, "
          f"{usual['parameters'] / 1e6:.1f}M parameters ({usual['parameters'] * 4 / gib:.3f} GiB fp32), "
          f"{args.steps} AdamW steps on {usual['device']}; memory: {usual['how']} over what was held before step 1")
    for name, result in results.items():
        print(f"  {name:5s}: peak +{result['peak_bytes'] / gib:.3f} GiB, {result['step_seconds']:.3f} s/step")
    print(f"peak memory ratio fused / usual: {fused['peak_bytes'] / usual['peak_bytes']:.3f}; "
          f"step time ratio: {fused['step_seconds'] / usual['step_seconds']:.3f}")
    drift = abs(fused["checksum"] - usual["checksum"]) / max(1.0, abs(usual["checksum"]))
    print(f"same weights after {args.steps} steps: relative checksum difference {drift:.2e}")


if __name__ == "__main__":
    main()
