"""A SimpleTuner-shaped config.json (its example's keys, adapted to SDXL with the recipe's flags; written here)
trains through `expertune train` to an exported expert (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertune.cli import main


@pytest.mark.integration
def test_a_simpletuner_config_json_trains_to_an_exported_expert(tiny_model_dir: Path, small_dataset: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from expertune.data.captioned import write_dataloader_config

    (tmp_path / "config").mkdir()
    dataloader = write_dataloader_config(tmp_path / "config" / "multidatabackend.json",
                                         small_dataset.parent / "images", tmp_path / "cache", resolution=64)
    library = tmp_path / "config" / "user_prompt_library.json"
    library.write_text(json.dumps({"red": "a red circle on a blue background", "sq": "a green square"}))
    output = tmp_path / "output" / "models"
    config = {
        "--resume_from_checkpoint": "latest", "--data_backend_config": str(dataloader),
        "--aspect_bucket_rounding": 2, "--seed": "-1", "--minimum_image_size": 0, "--output_dir": str(output),
        "--max_train_steps": "2", "--num_train_epochs": 0, "--checkpointing_steps": "1",
        "--checkpoints_total_limit": 5, "--hub_model_id": "me/stage1", "--push_to_hub": "true",
        "--push_checkpoints_to_hub": "true", "--tracker_project_name": "moe", "--tracker_run_name": "stage1",
        "--report_to": "none", "--model_type": "full", "--pretrained_model_name_or_path": str(tiny_model_dir),
        "--model_family": "sdxl", "--train_batch_size": 1, "--gradient_checkpointing": "true",
        "--caption_dropout_probability": 0.1, "--resolution_type": "pixel", "--resolution": 64,
        "--validation_seed": 42, "--validation_steps": 2, "--validation_resolution": "64x64,64x48",
        "--validation_guidance": 3.0, "--validation_guidance_rescale": "0.7", "--validation_num_inference_steps": "4",
        "--user_prompt_library": str(library), "--mixed_precision": "no", "--optimizer": "adamw",
        "--learning_rate": "1e-4", "--lr_scheduler": "polynomial", "--lr_warmup_steps": 1,
        "--validation_torch_compile": "false", "--disable_benchmark": "false",
        "--offset_noise": "true", "--noise_offset": "0.1", "--noise_offset_probability": "0.25",
        "--export_format": "diffusers,single_file",
        # the recipe's stage 1
        "--refiner_training": "true", "--refiner_training_strength": "0.35",
        "--refiner_training_invert_schedule": "true", "--prediction_type": "v_prediction",
        "--rescale_betas_zero_snr": "true", "--training_scheduler_timestep_spacing": "trailing",
    }
    (tmp_path / "config" / "config.json").write_text(json.dumps(config, indent=4))
    monkeypatch.chdir(tmp_path)  # found as SimpleTuner finds it: config/config.json, no --config
    monkeypatch.delenv("HF_TOKEN", raising=False)  # no token: the upload fails (exit 5) after the local export
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with caplog.at_level("INFO"):
        assert main(["train"]) == 5
    from expertune.expert_format import ExpertDescription

    expert = ExpertDescription.read(output / "pipeline")  # the exported expert: the recipe's stage-1 band
    assert (expert.band.lo, expert.band.hi) == (350, 999)
    run = json.loads((output / "run.json").read_text())
    seed = run["config"]["train"]["seed"]
    assert seed >= 0 and f"drew seed {seed}" in caplog.text  # -1 made concrete and recorded
    assert run["config"]["train"]["checkpoint_step_interval"] == 1 and run["config"]["train"]["offset_noise"]
    assert (output / "checkpoints").is_dir() and any((output / "checkpoints").iterdir())
    images = sorted(p.name for p in (output / "validation").rglob("*.png"))
    for name in ("red", "sq"):
        assert any(f"{name}_64x64" in i for i in images) and any(f"{name}_64x48" in i for i in images), images
    assert "hub upload folder for me/stage1" in caplog.text  # push_to_hub is expertune's own option
    single = sorted(p.name for p in (output / "single_file").iterdir())  # the ComfyUI / A1111 layout too
    assert "models-t350-999.safetensors" in single and "models-t350-999.yaml" in single, single  # output_dir's name
    # The same config again, two more steps: the run resumes from its checkpoint with the seed drawn the first time.
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["train", "--max_train_steps=3", "--allow_config_change"]) == 5
    assert f"the checkpoint's seed {seed}" in caplog.text
    assert json.loads((output / "run.json").read_text())["config"]["train"]["seed"] == seed


@pytest.mark.integration
def test_an_expertune_toml_trains_to_an_expert_in_both_layouts(tiny_model_dir: Path, small_dataset: Path,
                                                               tmp_path: Path) -> None:
    """The third config shape (expertune's TOML, its own option names) to both export layouts."""
    from safetensors import safe_open

    from expertune.data.captioned import write_dataloader_config

    dataloader = write_dataloader_config(tmp_path / "multidatabackend.json", small_dataset.parent / "images",
                                         tmp_path / "cache", resolution=64)
    output = tmp_path / "out"
    toml = tmp_path / "stage2.toml"
    toml.write_text("\n".join([
        f'pretrained_model_name_or_path = "{tiny_model_dir}"', f'data_backend_config = "{dataloader}"',
        f'output_dir = "{output}"', "max_train_steps = 1", "resolution = 64", "minimum_image_size = 0",
        "refiner_training = true", "refiner_training_strength = 0.35", "report_to = \"none\"",
        "validation_disable = true", 'export_format = "diffusers,single_file"', 'export_precision = "bf16"',
        "",
    ]), encoding="utf-8")
    assert main(["train", "--config", str(toml)]) == 0
    from expertune.expert_format import ExpertDescription

    expert = ExpertDescription.read(output / "pipeline")
    assert (expert.band.lo, expert.band.hi) == (0, 349)  # the recipe's stage 2 (not inverted)
    (single,) = (output / "single_file").glob("*.safetensors")
    with safe_open(str(single), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
        assert "v_pred" not in handle.keys()  # an epsilon expert says nothing of v-prediction
