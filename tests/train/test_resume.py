"""Runs that survive: exact resume, SIGTERM, EMA export, refusals (SIGKILL at any moment: test_kill_soak.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, same_weights, wait_for_steps, write_stage_env
from expertune.config import load_config
from expertune.errors import ConfigError, StorageError
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
QUICK = [*FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2", "--lr_scheduler=constant"]


def _config(env: Path, output: Path, *flags: str):
    config, _ = load_config(["--env", str(env), *QUICK, f"--output_dir={output}", *flags])
    return config


@pytest.fixture(scope="module")
def stage1_env(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    return write_stage_env(folder, 1, tiny_model_dir, folder / "unused", small_dataset)


@pytest.fixture(scope="module")
def reference_run(stage1_env: Path, tmp_path_factory) -> Path:
    """8 uninterrupted steps."""
    output = tmp_path_factory.mktemp("reference") / "run"
    train(_config(stage1_env, output, "--max_train_steps=8", "--checkpoint_step_interval=4"))
    return output


def test_resume_continues_exactly(stage1_env: Path, reference_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    train(_config(stage1_env, output, "--max_train_steps=4", "--checkpoint_step_interval=2",
                  "--checkpoints_total_limit=1"))
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-4"]
    resumed = train(_config(stage1_env, output, "--max_train_steps=8", "--checkpoint_step_interval=4",
                            "--resume_from_checkpoint=latest", "--allow_config_change"))
    assert resumed.summary["resumed_from"].endswith("checkpoint-4")
    assert same_weights(output / UNET, reference_run / UNET)
    assert [r["step"] for r in read_metrics(output / "metrics.jsonl")] == list(range(1, 9))
    reference_losses = [r["loss"] for r in read_metrics(reference_run / "metrics.jsonl")]
    assert [r["loss"] for r in read_metrics(output / "metrics.jsonl")] == reference_losses


def test_resume_refuses_changes_that_alter_the_run(stage1_env: Path, reference_run: Path) -> None:
    with pytest.raises(ConfigError, match="train_batch_size: 2 -> 1 \\(cannot change on resume\\)"):
        train(_config(stage1_env, reference_run, "--max_train_steps=8", "--checkpoint_step_interval=4",
                      "--resume_from_checkpoint=latest", "--train_batch_size=1"))
    with pytest.raises(ConfigError, match="validation_seed.*--allow_config_change"):
        train(_config(stage1_env, reference_run, "--max_train_steps=8", "--checkpoint_step_interval=4",
                      "--resume_from_checkpoint=latest", "--validation_seed=3"))


def _launch(env: Path, output: Path, *flags: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "expertune.cli", "train", "--env", str(env), *QUICK, f"--output_dir={output}",
            "--max_train_steps=8", "--checkpoint_step_interval=1", *flags]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(stage1_env: Path, reference_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "terminated"
    process = _launch(stage1_env, output, "--checkpoint_step_interval=100")
    wait_for_steps(output, 3, process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "--resume_from_checkpoint latest" in out
    saved = sorted(int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and saved[0] >= 3
    assert (output / "pipeline" / "expert.json").is_file()  # --export_on_interrupt (on by default) exported it
    process = _launch(stage1_env, output, "--checkpoint_step_interval=100", "--resume_from_checkpoint=latest")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert same_weights(output / UNET, reference_run / UNET)


def test_ema_is_checkpointed_and_exported(stage1_env: Path, tmp_path: Path) -> None:
    output = tmp_path / "ema"
    train(_config(stage1_env, output, "--max_train_steps=3", "--checkpoint_step_interval=3", "--use_ema",
                  "--ema_decay=0.5", "--ema_device=cpu", "--export_ema"))
    exported = load_file(output / UNET)
    trained = load_file(output / "checkpoints" / "checkpoint-3" / "unet.safetensors")
    shadow = load_file(output / "checkpoints" / "checkpoint-3" / "ema.safetensors")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(output / "pipeline"), subfolder="unet")
    names = [name for name, _ in unet.named_parameters()]  # the EMA's order
    assert len(names) == len(shadow)
    assert all(torch.equal(exported[name], shadow[str(i)]) for i, name in enumerate(names))
    assert any(not torch.equal(exported[name], trained[name]) for name in names), \
        "the exported UNet must hold the EMA weights, not the trained ones"
    assert json.loads((output / "pipeline" / "expert.json").read_text())["weights"] == "ema"
    with pytest.raises(ConfigError, match="export_ema.*needs use_ema"):
        load_config(["--export_ema"])


def test_unwritable_output_dir_is_a_clear_error(stage1_env: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="not writable") as info:
        train(_config(stage1_env, blocker / "run"))
    assert info.value.exit_code == 3
