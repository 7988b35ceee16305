"""Training refuses non-finite numbers: a NaN update is skipped (naming its images), several in a row stop the
run, and nothing non-finite is ever checkpointed or exported. And a second job in a busy output_dir is refused."""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.config import load_config
from expertune.errors import ConfigError, NonFiniteError
from expertune.run_folder import RunLock
from expertune.train import loop
from expertune.train.metrics import read_metrics

QUICK = [*FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2", "--lr_scheduler=constant"]


def _config(tmp_path: Path, model: Path, data: Path, *flags: str):
    env = write_stage_env(tmp_path, 1, model, tmp_path / "out", data)
    config, _ = load_config(["--env", str(env), *QUICK, *flags])
    return config


def _poison(monkeypatch: pytest.MonkeyPatch, calls: set[int] | None) -> None:
    """Make the loss of the given calls of the real denoising loss NaN (every call from the second: None)."""
    real, count = loop.denoising_loss, [0]

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if (calls is None and count[0] >= 2) or (calls is not None and count[0] in calls):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "denoising_loss", poisoned)


@pytest.mark.integration
def test_a_non_finite_update_is_skipped_and_named(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    _poison(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        result = loop.train(_config(tmp_path, tiny_model_dir, small_dataset, "--checkpoint_step_interval=1"))
    assert "step 2: non-finite loss or gradient norm; update skipped (1 in a row, limit 5)" in caplog.text
    assert "shape_" in caplog.text  # the batch's images are named
    rows = read_metrics(result.output_dir / "metrics.jsonl", kind="all")
    assert [r["step"] for r in rows if "kind" not in r] == [1, 2, 3]
    skipped = [r for r in rows if r.get("kind") == "skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and len(skipped[0]["items"]) == 2
    assert all(math.isfinite(r["loss"]) for r in rows if "kind" not in r)
    weights = load_file(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(bool(torch.isfinite(value).all()) for value in weights.values())
    assert sorted(p.name for p in (result.output_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]


@pytest.mark.integration
def test_non_finite_updates_in_a_row_stop_the_run_without_a_checkpoint(tiny_model_dir: Path, small_dataset: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, None)
    config = _config(tmp_path, tiny_model_dir, small_dataset, "--checkpoint_step_interval=1",
                     "--max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError, match=r"2 updates in a row .*max_nonfinite_steps=2.*step 2 with items .*shape_"):
        loop.train(config)
    output = tmp_path / "out"
    assert [p.name for p in (output / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (output / "pipeline").exists()
    assert not (output / ".expertune.lock").exists()  # released on the way out


def test_a_second_job_in_the_same_output_dir_is_refused(tiny_model_dir: Path, small_dataset: Path,
                                                        tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir, small_dataset)
    with RunLock(tmp_path / "out"):
        with pytest.raises(ConfigError, match=rf"in use by another expertune job \(PID {os.getpid()} on "
                                              rf"{socket.gethostname()}"):
            loop.train(config)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()
