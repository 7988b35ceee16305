"""A full disk during a run (on a real, size-limited tmpfs) is a clean stop: exit 3, one line naming the path,
nothing partial left, and a resume once space is freed ends bit for bit like an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST_FLAGS, same_weights, write_stage_env
from expertune.config import load_config
from expertune.errors import StorageError
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration

QUICK = [*FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2", "--max_train_steps=4",
         "--checkpoint_step_interval=1", "--checkpoints_total_limit=1"]
UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


def _config(env: Path, output: Path, *flags: str):
    config, _ = load_config(["--env", str(env), *QUICK, f"--output_dir={output}", *flags])
    return config


def _used(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("full-disk")
    env = write_stage_env(folder, 1, tiny_model_dir, folder / "unused", small_dataset)
    train(_config(env, folder / "reference"))
    return env, folder / "reference"


# a full disk in a checkpoint write: test_durability.py
@pytest.mark.parametrize("fails_in", ["the exported expert"])
def test_a_full_disk_stops_cleanly_and_the_resume_is_bitwise(fails_in: str, reference: tuple[Path, Path],
                                                             resizable_disk) -> None:
    env, done = reference
    checkpoint, pipeline = _used(done / "checkpoints"), _used(done / "pipeline")
    # checkpoint: room for one checkpoint and a half (the second cannot be written beside the first);
    # export: one checkpoint (the last step's) and half the pipeline
    room = checkpoint * 3 // 2 if fails_in == "checkpoint" else checkpoint + pipeline // 2
    flags = [] if fails_in == "checkpoint" else ["--checkpoint_step_interval=4"]
    disk = resizable_disk(room // 1024 + 32)
    output = disk / "run"
    with pytest.raises(StorageError) as info:
        train(_config(env, output, *flags))
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message and "disk is full" in message, message
    assert f"could not write {fails_in}" in message and str(output) in message, message
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob(".*")) == []  # nothing partial, no lock
    assert len(list((output / "checkpoints").glob("checkpoint-*"))) == 1
    resizable_disk(room // 1024 + 4 * pipeline // 1024 + 4096)  # space freed: the same file system, bigger
    result = train(_config(env, output, *flags, "--resume_from_checkpoint=latest"))
    assert same_weights(output / UNET, done / UNET)
    assert [r["step"] for r in read_metrics(output / "metrics.jsonl")] == [1, 2, 3, 4]
    assert result.summary["resumed_from"]
