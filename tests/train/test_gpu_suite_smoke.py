"""bench/gpu_suite.py runs end to end in its --smoke mode (the tiny layout, on whatever device is here), so the suite
is ready before a GPU is lent: every part prints its figures, with the torch version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # trains a mixture and generates: seconds

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_suite_smoke_run_prints_every_part(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    parts = {line["part"]: line for line in lines}
    assert set(parts) == {"env", "peak", "flops", "bare", "ema", "checkpoint", "offload", "expertune", "generate",
                          "ratio"}
    assert all(line["torch"] == torch.__version__ for line in lines)
    assert parts["peak"]["bf16_tflops"] > 0 and parts["peak"]["tf32_tflops"] > 0
    assert parts["flops"]["training_flops_per_sample"] > 0
    assert len([line for line in lines if line["part"] == "bare"]) == 3
    assert 0 < parts["expertune"]["mfu"] and parts["expertune"]["samples_per_s"] > 0
    assert parts["ratio"]["expertune_over_bare"] > 0 and parts["ema"]["foreach_over_loop"] > 0
    assert parts["generate"]["size"] == [64, 64]
