"""The kill soak: a 2-expert mixture job (EMA, warm-up + cosine, gradient accumulation 2, validation, one
checkpoint kept) SIGKILLed at chosen moments (inside a checkpoint write, between writing one and pruning the old
one, between two experts' exports, in a validation) and at random ones, resumed with `latest` each time, ends
bit for bit where an uninterrupted job ends, with each step logged once and no hidden scratch left.

`make test` runs 3 kills (inside a checkpoint write, between a new checkpoint and the pruning of the old one,
between two experts' exports); `EXPERTUNE_SOAK_KILLS=20 pytest -m integration tests/train/test_kill_soak.py`
runs a longer soak: those three, then random moments, every fourth inside a validation; a job that finishes
before its next kill is checked and a new one started (seed: EXPERTUNE_SOAK_SEED).
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


def _check_finished(output: Path, reference: Path) -> None:
    """The killed and resumed job ended where the uninterrupted one did, bit for bit, and left nothing hidden."""
    for k in range(2):
        assert same_weights(output / f"expert-{k}" / WEIGHTS, reference / f"expert-{k}" / WEIGHTS), k
    rows = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob(".*")) == []  # no hidden scratch
    assert [p.name for p in (output / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{STEPS}"]


def _moments(kills: int, rng: random.Random) -> list[str]:
    """The default form: the named phases in the order a job reaches them. A longer soak: then random moments,
    every fourth a kill inside a validation."""
    extra = ["validation" if k % 4 == 3 else "random" for k in range(max(0, kills - len(PHASES)))]
    return PHASES[:kills] + extra


def test_sigkill_anywhere_then_resume_latest_ends_bitwise_like_an_uninterrupted_job(
        tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    kills = int(os.environ.get("EXPERTUNE_SOAK_KILLS", len(PHASES)))
    rng = random.Random(int(os.environ.get("EXPERTUNE_SOAK_SEED", "20261203")))
    reference = tmp_path / "reference"
    process = _launch(tiny_model_dir, small_dataset, reference)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out

    mark, rounds, log = tmp_path / "paused-at", 0, []
    output = tmp_path / f"killed-{rounds}"

    def run(pause: str | None) -> subprocess.Popen:
        start = ["--resume_from_checkpoint=latest"]
        if not any((output / "checkpoints").glob("checkpoint-*")):
            start = ["--overwrite_output_dir"]  # killed before its first checkpoint: start again
        mark.unlink(missing_ok=True)
        return _launch(tiny_model_dir, small_dataset, output, *start, pause=pause, mark=mark)

    for moment in _moments(kills, rng):
        for _ in range(2):  # a moment the job is already past: it finishes; check it, and start a new job
            process = run(None if moment == "random" else moment)
            if moment == "random":
                target = rng.randint(1, STEPS - 1)
                hit = _kill_when(process, lambda: _steps_logged(output) >= target, delay=rng.uniform(0.0, 0.3))
            else:
                hit = _kill_when(process, mark.exists)
            out = process.communicate(timeout=300)[0]
            log.append(f"--- {output.name}, {moment}: {'killed' if hit else 'finished'} ---\n{out}")
            assert process.returncode == (-signal.SIGKILL if hit else 0), "\n".join(log)
            if hit:
                break
            assert moment not in PHASES, f"the job never reached {moment}"  # the default form hits each one
            _check_finished(output, reference)
            rounds += 1
            output = tmp_path / f"killed-{rounds}"
        else:
            raise AssertionError(f"a new job never reached {moment}")
    process = run(None)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, "\n".join([*log, out])
    _check_finished(output, reference)
