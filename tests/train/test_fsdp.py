"""FSDP: what this CPU machine can exercise of it.

accelerate runs FSDP only on GPUs (on CPUs it silently trains DDP), so `expertune train` refuses an FSDP
config here, and that refusal is tested. The part of FSDP that is expertune's own, gathering sharded weights
and optimizer state into a checkpoint and scattering them back (train.strategy.FullySharded), runs for real on
two CPU processes with torch's own FSDP2 `fully_shard` (fsdp_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST_FLAGS, write_stage_env
from expertune.cli import main

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"


def test_fsdp_checkpoint_gathers_and_restores_sharded_state(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded"]
    assert result["local_fraction"] < 0.6  # each rank holds about half of the weights
    assert result["snapshot_tensors"] == 542 and result["optimizer_keys_are_names"]
    assert result["restored_vs_continued"] == 0.0  # the restored run continues bit for bit
    assert result["sharded_vs_reference"] < 1e-5  # and sharding trained what one whole copy trains
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["optimizer_layout"] == "fsdp-full"


def test_fsdp_config_on_a_cpu_machine_is_refused(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path,
                                                 capsys) -> None:
    stage_env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    code = main(["train", "--env", str(stage_env), *FAST_FLAGS, "--num_processes=2",
                 f"--accelerate_config={EXAMPLES / 'fsdp.yaml'}"])
    assert code == 2
    assert "no GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was launched or written
