"""Issue 25: honest step timing in metrics.jsonl (seconds after the device finished, breakdown, samples/s, FLOPs,
MFU), and batch prefetching that changes nothing but the speed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS
from expertune.config import load_config
from expertune.train.metrics import read_metrics
from expertune.train.timing import StepClock, StepMeter, known_peak_tflops, training_flops

WEIGHTS = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.mark.integration  # builds SSD-1B on the meta device: seconds
def test_training_flops_are_three_forwards_and_match_the_layout_table() -> None:
    from expertune.models.layouts import ssd1b_unet_config
    from expertune.models.memory import layout_cost

    flops = training_flops(ssd1b_unet_config(), (4, 128, 128))  # SSD-1B at 1024 px, counted on the meta device
    assert flops == pytest.approx(3 * layout_cost("ssd-1b").forward_flops, rel=0.02)


def test_flops_are_counted_once_and_give_throughput_and_mfu() -> None:
    from expertune.models.tiny import POOLED_WIDTH, tiny_layout

    meter = StepMeter(torch.device("cpu"), breakdown_interval=2, peak_tflops=0.5)
    layout = tiny_layout().unet
    first_step = StepClock(torch.device("cpu"), breakdown=False)
    started = time.perf_counter()
    meter.count(layout, (4, 8, 8), 77, POOLED_WIDTH, clock=first_step)
    counting = time.perf_counter() - started
    assert first_step.finish() < counting / 2  # the counting is not the step's time
    per_sample = meter.flops_per_sample
    assert per_sample is not None and per_sample > 0 and not meter.count_flops  # counted once per run
    meter.count({"not": "a unet"}, (4, 8, 8))
    assert meter.flops_per_sample == per_sample
    broken = StepMeter(torch.device("cpu"))
    broken.count({"cross_attention_dim": "wide"}, (4, 8, 8))  # cannot be counted: no figure, no failure
    assert broken.flops_per_sample is None
    clock = meter.clock(2)
    assert clock.breakdown and not meter.clock(3).breakdown
    for part in StepClock.PARTS:
        clock.mark(part)
    seconds = clock.finish()
    figures = meter.figures(clock, seconds, global_samples=8, rank_samples=4)
    assert figures["samples_per_second"] == pytest.approx(8 / seconds, rel=1e-3)
    assert figures["tflops"] == pytest.approx(per_sample * 4 / seconds / 1e12, rel=1e-3)
    assert figures["mfu"] == pytest.approx(figures["tflops"] / 0.5, rel=1e-3)
    assert sum(figures[f"seconds_{p}"] for p in StepClock.PARTS) <= seconds
    assert known_peak_tflops(torch.device("cpu"), "bf16", False) is None


@pytest.mark.integration
def test_metrics_hold_synchronised_timing_and_prefetch_changes_nothing(tiny_model_dir: Path, small_dataset: Path,
                                                                       tmp_path: Path, caplog) -> None:
    from expertune.train.loop import train

    runs = {}
    for prefetch in ("true", "false"):
        output = tmp_path / f"prefetch-{prefetch}"
        # 2 of the 6 images held out; the run without prefetch validates once, scoring only the first of them
        validation = ["--validation_disable"] if prefetch == "true" else ["--eval_holdout_max_images=1"]
        config, _ = load_config([*FAST_FLAGS, "--max_train_steps=4", "--train_batch_size=2",
                                 "--gradient_accumulation_steps=2", "--report_to=none", *validation,
                                 f"--pretrained_model_name_or_path={tiny_model_dir}", "--use_ema",
                                 f"--data_backend_config={small_dataset}", f"--output_dir={output}",
                                 f"--prefetch_batches={prefetch}", "--timing_breakdown_interval=2",
                                 "--peak_tflops=0.01", "--eval_holdout_fraction=0.34"])
        with caplog.at_level("INFO", logger="expertune.validate.samples"):
            train(config)
        runs[prefetch] = output
        assert not [t for t in threading.enumerate() if t.name.startswith("expertune-prefetch")]
    assert "scoring the first 1 of 2 held-out images (eval_holdout_max_images)" in caplog.text
    assert any("eval/loss" in row for row in read_metrics(runs["false"] / "metrics.jsonl", kind="validation"))
    rows = read_metrics(runs["true"] / "metrics.jsonl")
    plain = read_metrics(runs["false"] / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain]  # same batches, same order, same numbers
    assert [(r["timestep_min"], r["timestep_max"]) for r in rows] == [(r["timestep_min"], r["timestep_max"])
                                                                      for r in plain]
    a, b = load_file(runs["true"] / WEIGHTS), load_file(runs["false"] / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for row in rows:
        assert row["samples"] == 4
        assert row["samples_per_second"] == pytest.approx(row["samples"] / row["seconds"], rel=1e-3)
        assert row["tflops"] > 0 and row["mfu"] == pytest.approx(row["tflops"] / 0.01, rel=1e-3)
        parts = [row.get(f"seconds_{p}") for p in StepClock.PARTS]
        if row["step"] % 2 == 0:
            assert all(p is not None and p >= 0 for p in parts) and sum(parts) <= row["seconds"]  # type: ignore
        else:
            assert parts == [None, None, None]
    # the per-sample FLOPs are one figure for the run: tflops · seconds is the same every step
    work = [row["tflops"] * row["seconds"] for row in rows]
    assert max(work) == pytest.approx(min(work), rel=1e-2)
