"""EMA update: the multi-tensor (`_foreach_lerp_`) update of `train/ema.py` against the per-tensor loop it replaced,
side by side in one run, on the tiny UNet's parameters and on an SSD-1B-sized parameter list (1.33 B parameters,
its layout's shapes, random values: 5.3 GB of weights plus 5.3 GB of shadow in float32 — run it alone).

    python bench/ema_update.py                          # tiny and ssd-1b, on the CPU (or --device cuda)
    python bench/ema_update.py --layouts tiny --repeats 50

Prints one JSON line per layout: median seconds per update of each, and foreach / loop (target <= 0.25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parameters(layout: str, device: torch.device) -> list[torch.nn.Parameter]:
    from diffusers import UNet2DConditionModel

    from expertune.models.layouts import ssd1b_unet_config
    from expertune.models.tiny import tiny_layout

    config = tiny_layout().unet if layout == "tiny" else ssd1b_unet_config()
    with torch.device("meta"):
        shapes = [p.shape for p in UNet2DConditionModel(**config).parameters()]
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in shapes]


def loop_update(shadow: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float, device: torch.device
                ) -> None:
    """The update as it was: one lerp_ (and one copy) per parameter."""
    with torch.no_grad():
        for s, p in zip(shadow, params, strict=True):
            s.lerp_(p.detach().to(device, torch.float32), 1.0 - decay)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(layout: str, device: torch.device, repeats: int) -> dict:
    from expertune.train.ema import ExponentialMovingAverage

    params = parameters(layout, device)
    ema = ExponentialMovingAverage(params, 0.999, device)
    reference = [s.clone() for s in ema.shadow]
    ema.update(params)  # warm-up (and decay 0 → 1-step warm-up as in training)
    loop_update(reference, params, 0.0, device)
    times: dict[str, list[float]] = {"loop": [], "foreach": []}
    for _ in range(repeats):  # interleaved, so a neighbour's load touches both alike
        for name in ("loop", "foreach"):
            synchronize(device)
            started = time.perf_counter()
            if name == "loop":
                loop_update(reference, params, 0.9, device)
            else:
                ema.update(params)  # the trainer's update, as the loop calls it
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    loop, foreach = statistics.median(times["loop"]), statistics.median(times["foreach"])
    return {"layout": layout, "device": str(device), "tensors": len(params),
            "parameters": sum(p.numel() for p in params), "loop_s": round(loop, 6), "foreach_s": round(foreach, 6),
            "foreach_over_loop": round(foreach / loop, 3), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="tiny,ssd-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="updates timed per variant (0: 50 tiny, 5 ssd-1b)")
    args = parser.parse_args()
    for layout in args.layouts.split(","):
        repeats = args.repeats or (50 if layout == "tiny" else 5)
        print(json.dumps(measure(layout, torch.device(args.device), repeats)), flush=True)


if __name__ == "__main__":
    main()
