"""How much cache-read latency the batch prefetch hides: `expertune train` (in this process, the tiny model, warm
caches) with 2 ms added to every cache-entry open (`CacheStore.get`, one file each), with and without
`--prefetch_batches`, and the same two without the added latency, side by side in one run.

    python bench/prefetch_latency.py                   # 30 steps of batch 8 at 64 px, ~1-2 minutes on 2 cores
    python bench/prefetch_latency.py --latency_ms 2 --steps 40 --batch_size 8

Every step is broken down (--timing_breakdown_interval=1): `seconds_data` is the time the training thread spends
getting its batches (waiting for the read-ahead, with prefetch), which is where read latency shows; the step's
compute is not, so a busy machine's noise in it does not hide the signal. hidden = 1 - (data-time slowdown with
prefetch) / (data-time slowdown without), each slowdown the median seconds_data with the latency minus without
it (target >= 0.8); the median step times are printed beside. Prints one JSON line per run and one with the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def prepare(work: Path, images: int) -> tuple[Path, Path]:
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config
    from expertune.models.tiny import build_random_pipeline, tiny_layout

    model = work / "model"
    build_random_pipeline(model, tiny_layout(), seed=0)
    folder = work / "images"
    for index in range(images):
        shape, colour, background = SHAPES[index % len(SHAPES)]
        save_captioned_image(draw_shape(shape, colour, background, size=64), folder / f"shape_{index:03d}.png",
                             f"a {colour} {shape} on a {background} background, number {index}")
    return model, write_dataloader_config(work / "dataloader.json", folder, work / "cache", 64)


def run(model: Path, data: Path, out: Path, steps: int, batch: int, prefetch: bool) -> tuple[float, float]:
    from expertune.config import load_config
    from expertune.train.loop import train
    from expertune.train.metrics import read_metrics

    config, _ = load_config([f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}",
                             f"--output_dir={out}", "--resolution=64", f"--train_batch_size={batch}",
                             f"--max_train_steps={steps}", "--learning_rate=1e-5", "--report_to=none",
                             "--validation_disable", "--overwrite_output_dir", f"--prefetch_batches={prefetch}",
                             "--timing_breakdown_interval=1"])
    train(config)
    rows = read_metrics(out / "metrics.jsonl")
    rows = rows[3:] or rows
    return (statistics.median(row["seconds_data"] for row in rows), statistics.median(row["seconds"] for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency_ms", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from expertune.cache.store import CacheStore

    work = args.work or Path(tempfile.mkdtemp(prefix="prefetch-bench-"))
    model, data = prepare(work, 2 * args.batch_size)
    run(model, data, work / "warm", 1, args.batch_size, False)  # fills the caches
    original = CacheStore.get

    def slow_get(self: CacheStore, key: str):  # type: ignore[no-untyped-def]
        time.sleep(args.latency_ms / 1000)
        return original(self, key)

    medians: dict[tuple[bool, bool], float] = {}
    for latency in (False, True):
        CacheStore.get = slow_get if latency else original  # type: ignore[method-assign]
        for prefetch in (False, True):
            data_s, step_s = run(model, data, work / f"run-{latency}-{prefetch}", args.steps, args.batch_size,
                                 prefetch)
            medians[(latency, prefetch)] = data_s
            print(json.dumps({"latency_ms": args.latency_ms if latency else 0, "prefetch": prefetch,
                              "median_data_s": round(data_s, 5), "median_step_s": round(step_s, 5)}), flush=True)
    CacheStore.get = original  # type: ignore[method-assign]
    without = medians[(True, False)] - medians[(False, False)]
    with_prefetch = medians[(True, True)] - medians[(False, True)]
    injected = 2 * args.batch_size * args.latency_ms / 1000  # a latent and an embedding entry per sample
    print(json.dumps({"injected_s_per_step": injected, "data_slowdown_without_prefetch_s": round(without, 5),
                      "data_slowdown_with_prefetch_s": round(with_prefetch, 5),
                      "hidden": round(1 - with_prefetch / without, 3) if without > 0 else None,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
