"""Validation images reach W&B: each expert's, the chain's and stage 2's dataset inputs (its input | noised |
output grids), and a table of name, prompt, step and image per validation. Read back from the files of the
offline run (WANDB_MODE=offline, WANDB_DIR in tmp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import FAST_FLAGS
from expertune.config import load_config
from expertune.train.loop import train
from expertune.validate.samples import VALIDATION_TABLE_COLUMNS

pytestmark = pytest.mark.integration  # trains


def test_a_mixture_logs_every_validation_grid_and_table_to_wandb(tiny_model_dir: Path, small_dataset: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where a table's artifact is staged
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    config, _ = load_config([
        *FAST_FLAGS, f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={small_dataset}",
        f"--output_dir={tmp_path / 'out'}", "--report_to=wandb", "--mixture_boundaries=350", "--max_train_steps=2",
        "--validation_step_interval=1", "--validation_using_datasets", "--train_batch_size=2"])
    train(config)
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))
    media = run / "files" / "media"
    images = sorted(p.relative_to(media / "images").as_posix() for p in (media / "images").rglob("*.png"))
    for step in (1, 2):  # the interval validation at step 1, the final one at step 2
        for key in ("expert_0/validation/text_to_image_prompt", "expert_0/validation/chain_prompt",
                    "expert_1/validation/partial_denoise_00"):
            assert any(name.startswith(f"{key}_{step}_") for name in images), (key, step, images)
    grid = Image.open(next((media / "images").rglob("expert_1/validation/partial_denoise_00_1_*.png")))
    assert grid.size == (3 * 64, 64)  # input | noised | output, from a dataset image
    tables = sorted((media / "table").rglob("*.table.json"))
    assert {p.relative_to(media / "table").as_posix().rsplit("_", 2)[0] for p in tables} == {
        "expert_0/validation/samples", "expert_1/validation/samples"}
    rows = []
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == list(VALIDATION_TABLE_COLUMNS)
        rows += table["data"]
    assert {(row[0], row[2]) for row in rows} >= {("text_to_image_prompt", 1), ("chain_prompt", 2),
                                                   ("partial_denoise_00", 1), ("partial_denoise_00", 2)}
    by_name = {row[0]: row for row in rows}
    assert by_name["text_to_image_prompt"][1] == "a red circle, for validation"
    assert by_name["partial_denoise_00"][3] == "Image"  # a W&B image cell: the table's artifact holds the file
    staged = [Image.open(p).size for p in (tmp_path / "wandb-data" / "artifacts" / "staging").iterdir()
              if p.read_bytes()[:4] == b"\x89PNG"]
    assert staged.count((3 * 64, 64)) >= 4 and staged.count((64, 64)) >= 4  # grids and text-to-image, 2 steps
