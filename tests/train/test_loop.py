"""End-to-end training from the recipe's own config.env, on the tiny SDXL-layout model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

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


@pytest.mark.parametrize("flags", [["--mixed_precision=bf16", "--optimizer=adafactor"], ["--optimizer=prodigy",
                                                                                         "--learning_rate=1.0"]])
def test_precision_and_optimizer_choices_train(flags, tiny_model_dir: Path, small_dataset: Path,
                                               tmp_path: Path) -> None:
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=2", "--report_to=none",
                             "--validation_disable", "--train_batch_size=2", *flags])
    result = train(config)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert len(records) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite
    trained = load_file(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert trained["conv_in.weight"].dtype == torch.float32  # mixed precision keeps fp32 master weights


def test_cache_verb_then_train_on_buckets_lists_buckets_and_skipped_images(
        tiny_model_dir: Path, messy_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from helpers import MESSY_SKIPPED
    from expertune.cli import main

    flags = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={messy_dataset}",
             f"--output_dir={tmp_path / 'out'}", "--max_train_steps=2", "--train_batch_size=2",
             "--learning_rate=1e-4", "--validation_disable", "--report_to=none", "--timestep_range=0,999"]
    assert main(["cache", "--stats_json", str(tmp_path / "cache.json"), *flags]) == 0
    printed = capsys.readouterr().out
    assert "cache: latents_encoded=12 latents_reused=0 embeds_encoded=13 embeds_reused=0" in printed
    assert "bucket photos 96x64: 2 images" in printed and "skipped " in printed
    assert not (tmp_path / "out").exists()  # caching trains nothing and writes no run

    config, _ = load_config(flags)
    result = train(config)
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["cache"] == {"latents_encoded": 0, "latents_reused": 12, "embeds_encoded": 0, "embeds_reused": 13}
    cached = json.loads((tmp_path / "cache.json").read_text())
    assert cached["cache"]["latents_encoded"] == 12 and cached["buckets"] == run["buckets"]
    assert cached["skipped_images"] == run["skipped_images"]
    assert [(b["dataset"], b["width"], b["height"], b["samples"]) for b in run["buckets"]] == [
        ("photos", 64, 64, 6), ("photos", 96, 64, 2), ("photos", 64, 96, 1), ("names", 64, 64, 4),
        ("subject", 64, 64, 1)]
    skipped = {Path(entry["path"]).name: entry for entry in run["skipped_images"]}
    assert set(skipped) == set(MESSY_SKIPPED)
    assert all(words in skipped[name]["reason"] and skipped[name]["dataset"] == "photos"
               for name, words in MESSY_SKIPPED.items())
    assert run["samples_per_epoch"] == 14
    assert [r["samples"] for r in read_metrics(result.output_dir / "metrics.jsonl")] in ([2, 2], [2, 1], [1, 2], [1, 1])


def test_a_failing_final_validation_does_not_lose_the_expert(tiny_model_dir: Path, small_dataset: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expert is exported before the final validation: an error there leaves a complete pipeline."""
    from expertune.validate.samples import Validator

    def broken(self, unet, step):  # noqa: ANN001
        raise RuntimeError("validation broke")

    monkeypatch.setattr(Validator, "run", broken)
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=1", "--report_to=none",
                             "--train_batch_size=2"])
    with pytest.raises(RuntimeError, match="validation broke"):
        train(config)
    pipeline = tmp_path / "out" / "pipeline"
    assert json.loads((pipeline / "expert.json").read_text())["timestep_range"] == [350, 999]
    assert (pipeline / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_min_snr_changes_what_training_minimises(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    """The same two steps (same draws, same data) with and without `--snr_gamma 5`: min-SNR weights every sample
    (v-prediction: min(SNR, 5) / (SNR + 1) < 1), so the logged loss and the trained weights differ."""
    runs = {}
    for name, flags in (("plain", ["--loss_weighting=none"]), ("min_snr", ["--snr_gamma=5"])):
        env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / name, small_dataset)
        config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=2", "--report_to=none",
                                 "--validation_disable", "--train_batch_size=2", *flags])
        runs[name] = train(config)
    losses = {name: [r["loss"] for r in read_metrics(result.output_dir / "metrics.jsonl")]
              for name, result in runs.items()}
    assert len(losses["plain"]) == len(losses["min_snr"]) == 2
    assert losses["min_snr"][0] < losses["plain"][0]  # step 1: the same model and draws, every weight below 1
    trained = {name: load_file(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
               for name, result in runs.items()}
    assert any(not torch.equal(trained["plain"][k], trained["min_snr"][k]) for k in trained["plain"])
    assert json.loads((runs["min_snr"].output_dir / "run.json").read_text())["config"]["train"]["snr_gamma"] == 5.0
