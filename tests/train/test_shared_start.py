"""A shared start, then the split, in one job (`--mixture_shared_steps`, train/branch.py): the trunk trains on every
timestep, each expert branches from it with its weights, optimizer state, EMA and data position, and a run resumed
before, at or after the split equals the uninterrupted one bit for bit. The same run has an overlap
(`--mixture_overlap`): after the split each expert draws its timesteps from its band widened by the margin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAST_FLAGS, same_weights
from expertune.config import load_config
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains: not in `make test-fast`

WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
RUN = ["--mixture_boundaries=350", "--mixture_schedule=alternate", "--max_train_steps=7", "--mixture_shared_steps=3",
       "--checkpoint_step_interval=1", "--use_ema", "--expert_learning_rates=2e-4,5e-5", "--expert_ema_decays=0.9,0.99",
       "--lr_scheduler=cosine", "--lr_warmup_steps=1", "--mixture_overlap=300"]


def _config(model: Path, data: Path, output: Path, *extra: str):
    config, _ = load_config([*FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2",
                             f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}",
                             f"--output_dir={output}", "--prediction_type=v_prediction", "--rescale_betas_zero_snr",
                             *RUN, *extra])
    return config


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's folder (later resumed in place: an output_dir cannot change on resume), and a copy of
    what it made in `<it>.reference/`."""
    output = tmp_path_factory.mktemp("shared") / "run"
    train(_config(tiny_model_dir, small_dataset, output))
    shutil.copytree(output, output.with_name("run.reference"))
    return output


def test_the_trunk_trains_every_timestep_then_the_experts_branch_from_it(uninterrupted: Path,
                                                                          tiny_model_dir: Path) -> None:
    rows = read_metrics(uninterrupted / "metrics.jsonl")
    assert [(r["step"], r["expert"], r.get("shared", False)) for r in rows] == [
        (1, 0, True), (2, 0, True), (3, 0, True), (4, 0, False), (5, 1, False), (6, 0, False), (7, 1, False)]
    assert [r["expert_step"] for r in rows] == [1, 2, 3, 4, 1, 5, 2]  # expert 0 counts its trunk steps
    assert max(r["timestep_max"] for r in rows[:3]) >= 350 > min(r["timestep_min"] for r in rows[:3])  # both bands
    # after the split: each expert inside its band widened by 300 timesteps, and into the margin
    assert all(r["timestep_min"] >= 50 for r in rows[3:] if r["expert"] == 0)
    assert all(r["timestep_max"] <= 649 for r in rows[3:] if r["expert"] == 1)
    assert any(r["timestep_max"] > 349 for r in rows[3:] if r["expert"] == 1)
    mixture = json.loads((uninterrupted / "mixture.json").read_text())
    assert [(e["timestep_range"], e["training_timestep_range"]) for e in mixture["experts"]] == [
        ([350, 999], [50, 999]), ([0, 349], [0, 649])]
    expert = json.loads((uninterrupted / "expert-1" / "pipeline" / "expert.json").read_text())
    assert (expert["timestep_range"], expert["training_timestep_range"]) == ([0, 349], [0, 649])
    checkpoints = uninterrupted / "checkpoints"
    base = tiny_model_dir / WEIGHTS
    before = checkpoints / "checkpoint-3"
    assert json.loads((before / "state.json").read_text())["experts"] == 2
    # before the split expert 1 is the untouched starting model; after it (step 4 was expert 0's) a copy of the trunk:
    # its weights, optimizer moments and EMA
    from safetensors.torch import load_file

    untouched = load_file(str(before / "expert-1" / "unet.safetensors"))
    assert all(torch.equal(untouched[k], v) for k, v in load_file(str(base)).items())
    after = checkpoints / "checkpoint-4" / "expert-1"
    for name in ("unet.safetensors", "optimizer.safetensors", "ema.safetensors"):
        assert same_weights(after / name, before / "expert-0" / name), name
    assert json.loads((after / "state.json").read_text())["step"] == 0
    summary = json.loads((uninterrupted / "run.json").read_text())
    assert summary["mixture"]["shared_steps"] == 3
    assert [e["learning_rate"] for e in summary["mixture"]["experts"]] == [2e-4, 5e-5]


@pytest.mark.parametrize("resume_at", [2, 3, 5])  # before, at and after the split
def test_a_run_resumed_across_the_split_is_the_uninterrupted_run(uninterrupted: Path, tiny_model_dir: Path,
                                                                 small_dataset: Path, resume_at: int) -> None:
    reference = uninterrupted.with_name("run.reference")
    name = f"checkpoint-{resume_at}"
    train(_config(tiny_model_dir, small_dataset, uninterrupted, f"--resume_from_checkpoint={name}"))
    for k in range(2):
        assert same_weights(uninterrupted / f"expert-{k}" / "pipeline" / WEIGHTS,
                            reference / f"expert-{k}" / "pipeline" / WEIGHTS), k
    rows = [(r["step"], r["expert"], r["loss"], r["lr"]) for r in read_metrics(uninterrupted / "metrics.jsonl")]
    assert rows == [(r["step"], r["expert"], r["loss"], r["lr"]) for r in read_metrics(reference / "metrics.jsonl")]
    assert same_weights(uninterrupted / "checkpoints" / "checkpoint-7" / "expert-0" / "optimizer.safetensors",
                        reference / "checkpoints" / "checkpoint-7" / "expert-0" / "optimizer.safetensors")
