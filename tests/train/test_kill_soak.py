"""The kill soak: a 2-expert mixture job (EMA, warm-up + cosine, gradient accumulation 2, validation, one
checkpoint kept) SIGKILLed at chosen moments (inside a checkpoint write, between writing one and pruning the old
one, between two experts' exports, in a validation) and at random ones, resumed with `latest` each time, ends
bit for bit where an uninterrupted job ends, with each step logged once and no hidden scratch left.

`make test` runs 3 kills (inside a checkpoint write, between a new checkpoint and the pruning of the old one,
between two experts' exports); `EXPERTUNE_SOAK_KILLS=20 pytest -m integration
tests/train/test_kill_soak.py` runs a longer soak: random moments (the last of them inside a validation), then
those three (seed: EXPERTUNE_SOAK_SEED).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST_FLAGS, same_weights
from expertune.train.metrics import read_metrics
from expertune.train.signals import PAUSE_AT, PAUSE_MARK

pytestmark = pytest.mark.integration

PHASES = ["checkpoint-files", "checkpoint-prune", "export"]  # in the order a job reaches them
STEPS = 6
JOB = [*FAST_FLAGS, "--report_to=none", "--mixture_boundaries=350", f"--max_train_steps={STEPS}", "--use_ema",
       "--ema_decay=0.9", "--export_ema", "--lr_scheduler=cosine", "--lr_warmup_steps=2",
       "--gradient_accumulation_steps=2", "--train_batch_size=1", "--validation_step_interval=3",
       "--checkpoint_step_interval=1", "--checkpoints_total_limit=1", "--mixture_schedule=proportional"]
WEIGHTS = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


def _launch(model: Path, data: Path, output: Path, *extra: str, pause: str | None = None,
            mark: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "expertune.cli", "train", f"--pretrained_model_name_or_path={model}",
            f"--data_backend_config={data}", f"--output_dir={output}", *JOB, *extra]
    env = {k: v for k, v in os.environ.items() if k not in (PAUSE_AT, PAUSE_MARK)}
    if pause is not None:
        env.update({PAUSE_AT: pause, PAUSE_MARK: str(mark)})
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    return len(read_metrics(path)) if path.exists() else 0


def _kill_when(process: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120) -> bool:
    """SIGKILL `process` `delay` seconds after `ready()` holds; False when it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready():
        assert time.monotonic() < deadline, "the job never reached the moment to kill it"
        time.sleep(0.01)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def test_sigkill_anywhere_then_resume_latest_ends_bitwise_like_an_uninterrupted_job(
        tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    kills = int(os.environ.get("EXPERTUNE_SOAK_KILLS", len(PHASES)))
    randoms = max(0, kills - len(PHASES))  # a longer soak: random moments (and validation) first
    rng = random.Random(int(os.environ.get("EXPERTUNE_SOAK_SEED", "20261203")))
    reference = tmp_path / "reference"
    process = _launch(tiny_model_dir, small_dataset, reference)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out

    output, mark = tmp_path / "killed", tmp_path / "paused-at"
    done, killed, outputs = False, [], []
    for attempt in range(kills + 1):
        start = ["--resume_from_checkpoint=latest"]
        if not any((output / "checkpoints").glob("checkpoint-*")):
            start = ["--overwrite_output_dir"]  # killed before its first checkpoint: start again
        if attempt == kills:  # the last run goes to the end
            process = _launch(tiny_model_dir, small_dataset, output, *start)
            out, _ = process.communicate(timeout=300)
            outputs.append(out)
            assert process.returncode == 0, "\n".join(outputs)
            done = True
            break
        mark.unlink(missing_ok=True)
        if attempt == randoms - 1:
            phase = "validation"
            process = _launch(tiny_model_dir, small_dataset, output, *start, pause=phase, mark=mark)
            hit = _kill_when(process, mark.exists)
        elif attempt >= randoms:
            phase = PHASES[attempt - randoms]
            process = _launch(tiny_model_dir, small_dataset, output, *start, pause=phase, mark=mark)
            hit = _kill_when(process, mark.exists)
        else:
            phase, target = "random", rng.randint(1, STEPS - 1)
            process = _launch(tiny_model_dir, small_dataset, output, *start)
            hit = _kill_when(process, lambda: _steps_logged(output) >= target, delay=rng.uniform(0.0, 0.3))
        out = process.communicate(timeout=300)[0] if process.returncode is None else process.stdout.read()
        outputs.append(f"--- attempt {attempt} ({phase}, killed={hit}) ---\n{out}")
        assert process.returncode in (0, -signal.SIGKILL), "\n".join(outputs)
        killed.append((phase, hit))
        if process.returncode == 0:
            done = True
            break
    assert done and any(hit for _, hit in killed), killed
    if not randoms:  # the default form: each named moment was reached and killed there
        assert all(hit for _, hit in killed), killed
    for k in range(2):
        assert same_weights(output / f"expert-{k}" / WEIGHTS, reference / f"expert-{k}" / WEIGHTS), k
    rows = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob(".*")) == []  # no hidden scratch
    assert [p.name for p in (output / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{STEPS}"]
