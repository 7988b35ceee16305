"""A stored loss baseline (torchtitan's habit): the first losses of the recipe's stage 1 on the world model.

The recipe's stage-1 config.env (v-prediction, zero-terminal SNR, trailing, band [350, 999]) trains the
committed world base on 16 fixed world images for a few steps; the losses and the drawn timesteps must match
`tests/assets/world_stage1_loss_baseline.json`. The tolerance (relative 2e-3) absorbs BLAS and thread-count
differences between machines; a change to the target, the noise or timestep draws, the band or the data order
moves these numbers by far more and fails the test.

To regenerate it deliberately (after a change that is meant to alter training numerics), run alone:

    EXPERTUNE_REGENERATE_BASELINE=1 .venv/bin/python -m pytest tests/train/test_loss_baseline.py

and commit the new JSON with a message that says why the numbers changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from expertune.config import load_config
from expertune.data.captioned import write_dataloader_config
from expertune.demo.recipe import recipe_env
from expertune.io_utils import atomic_write_json
from expertune.train.loop import train
from expertune.world import PRETRAINED
from expertune.world.dataset import write_world_dataset
from expertune.world.scene import all_combinations, scenes

BASELINE = Path(__file__).resolve().parents[1] / "assets" / "world_stage1_loss_baseline.json"
STEPS = 6
RELATIVE_TOLERANCE = 2e-3


def _first_losses(tmp_path: Path) -> list[dict]:
    images = write_world_dataset(tmp_path / "data", scenes(all_combinations()[::11], 1, seed=2024))
    dataloader = write_dataloader_config(tmp_path / "dataloader.json", images, tmp_path / "cache", 64)
    env = tmp_path / "stage1.env"
    env.write_text(recipe_env(1, PRETRAINED / "base", tmp_path / "stage1", dataloader))
    config, _ = load_config(["--env", str(env), f"--max_train_steps={STEPS}", "--resolution=64",
                             "--learning_rate=1e-4", "--validation_disable", "--report_to=none"])
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "timestep_min", "timestep_max")} for r in rows if "loss" in r]


@pytest.mark.integration
def test_first_stage1_losses_match_the_stored_baseline(tmp_path: Path) -> None:
    measured = _first_losses(tmp_path)
    if os.environ.get("EXPERTUNE_REGENERATE_BASELINE") == "1":
        atomic_write_json(BASELINE, {"steps": measured, "relative_tolerance": RELATIVE_TOLERANCE,
                                     "how": "EXPERTUNE_REGENERATE_BASELINE=1 pytest tests/train/test_loss_baseline.py"})
    stored = json.loads(BASELINE.read_text())["steps"]
    assert [(r["step"], r["timestep_min"], r["timestep_max"]) for r in measured] == \
        [(r["step"], r["timestep_min"], r["timestep_max"]) for r in stored]
    for got, want in zip(measured, stored):
        assert got["loss"] == pytest.approx(want["loss"], rel=RELATIVE_TOLERANCE), got["step"]
