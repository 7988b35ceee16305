"""The UI's Stop: a `stop_requested` file in output_dir makes a training run save a checkpoint and stop (exit 143),
as SIGTERM does, and the file is gone afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST_FLAGS, write_stage_env

from expertune.errors import TrainingInterrupted

pytestmark = pytest.mark.integration  # trains


def test_stop_file_stops_a_run_after_a_checkpoint(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    from expertune.config import load_config
    from expertune.train.loop import train

    output = tmp_path / "stage1"
    output.mkdir()
    (output / "stop_requested").write_text("from the test\n")
    env = write_stage_env(tmp_path, 1, tiny_model_dir, output, small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=5", "--validation_disable",
                             "--export_on_interrupt=false"])
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config)
    assert stopped.value.exit_code == 143
    assert [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-1"]
    assert not (output / "stop_requested").exists()
