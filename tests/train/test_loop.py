"""End-to-end training from the recipe's own config.env, on the tiny SDXL-layout model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_FLAGS, write_stage_env
from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

METRIC_FIELDS = {"step", "loss", "lr", "timestep_min", "timestep_max", "epoch", "samples", "grad_norm"}


def _check_run(result, band: tuple[int, int], steps: int) -> list[dict]:
    lo, hi = band
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert METRIC_FIELDS <= set(record)
        assert lo <= record["timestep_min"] <= record["timestep_max"] <= hi, record
        assert record["loss"] > 0 and record["lr"] > 0
    expert = json.loads((result.pipeline_dir / "expert.json").read_text())
    assert expert["timestep_range"] == [lo, hi]
    assert expert["num_train_timesteps"] == 1000
    assert expert["prediction_type"] == "v_prediction"
    assert expert["rescale_betas_zero_snr"] is True
    assert expert["timestep_spacing"] == "trailing"
    scheduler = json.loads((result.pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    return records


def test_recipe_stage_1_then_stage_2_share_caches(trained_experts, small_dataset: Path) -> None:
    stage1, stage2 = trained_experts
    _check_run(stage1, (350, 999), 3)
    _check_run(stage2, (0, 349), 3)
    run1 = json.loads((stage1.output_dir / "run.json").read_text())
    run2 = json.loads((stage2.output_dir / "run.json").read_text())
    # Six images, six captions plus the validation prompt: encoded once by stage 1, reused by stage 2.
    assert run1["cache"] == {"latents_encoded": 6, "latents_reused": 0, "embeds_encoded": 7, "embeds_reused": 0}
    assert run2["cache"] == {"latents_encoded": 0, "latents_reused": 6, "embeds_encoded": 0, "embeds_reused": 7}
    # The recipe's values arrived intact through config.env + TRAINER_EXTRA_ARGS.
    assert run1["config"]["train"]["train_batch_size"] == 8
    assert run1["config"]["train"]["gradient_checkpointing"] is True
    assert run2["config"]["validation"]["validation_using_datasets"] is True
    assert run1["skipped_images"] == []


def test_only_the_unet_is_trained(trained_experts, tiny_model_dir: Path) -> None:
    stage1, _ = trained_experts
    for part, changed in (("unet", True), ("vae", False)):
        name = "diffusion_pytorch_model.safetensors"
        before, after = load_file(tiny_model_dir / part / name), load_file(stage1.pipeline_dir / part / name)
        differs = any(not torch.equal(before[k], after[k]) for k in before)
        assert differs is changed, part
    for part in ("text_encoder", "text_encoder_2"):
        before = load_file(tiny_model_dir / part / "model.safetensors")
        after = load_file(stage1.pipeline_dir / part / "model.safetensors")
        assert all(torch.equal(before[k], after[k]) for k in before), part


def test_validation_images_and_tensorboard(trained_experts) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage1, stage2 = trained_experts
    assert (stage1.output_dir / "validation" / "step_000003" / "text_to_image_prompt.png").is_file()
    grids = sorted((stage2.output_dir / "validation" / "step_000003").glob("partial_denoise_*.png"))
    assert grids, "stage 2 validates by partially denoising dataset images"
    from PIL import Image

    assert Image.open(grids[0]).size == (3 * 64, 64)  # input | noised | output
    events = EventAccumulator(str(stage1.output_dir / "logs"), size_guidance={"images": 0, "scalars": 0})
    event_files = list((stage1.output_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    found_scalars, found_images = set(), set()
    for event_file in event_files:
        acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0}).Reload()
        found_scalars |= set(acc.Tags()["scalars"])
        found_images |= set(acc.Tags()["images"])
    assert {"train/loss", "train/lr", "train/grad_norm"} <= found_scalars
    assert "validation/text_to_image_prompt" in found_images
    del events


@pytest.mark.parametrize("stage, band", [(1, (350, 999)), (2, (0, 349))])
def test_band_holds_at_batch_size_one(stage: int, band, tiny_model_dir: Path, small_dataset: Path,
                                      tmp_path: Path) -> None:
    env = write_stage_env(tmp_path, stage, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--train_batch_size=1", "--max_train_steps=6",
                             "--gradient_accumulation_steps=2", "--report_to=none"])
    result = train(config)
    records = _check_run(result, band, 6)
    assert all(r["samples"] == 2 for r in records)  # 2 micro-batches of 1 per optimizer step


def test_refuses_to_overwrite_an_earlier_run(trained_experts, tmp_path: Path, small_dataset: Path,
                                             tiny_model_dir: Path) -> None:
    stage1, _ = trained_experts
    env = write_stage_env(tmp_path, 1, tiny_model_dir, stage1.output_dir, small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS])
    before = (stage1.output_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite_output_dir"):
        train(config)
    assert (stage1.output_dir / "metrics.jsonl").read_bytes() == before
