"""Issue 23's knobs in real (tiny) training runs: what they record, and that they take effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.config import load_config
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains: not in `make test-fast`


def test_a_dora_expert_with_huber_loss_biased_timesteps_and_flips(tiny_model_dir: Path, small_dataset: Path,
                                                                   tmp_path: Path) -> None:
    env = write_stage_env(tmp_path, 2, tiny_model_dir, tmp_path / "out", small_dataset)  # band [0, 349]
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=4", "--report_to=none",
                             "--validation_disable", "--train_batch_size=2", "--model_type=lora", "--use_dora",
                             "--lora_rank=4", "--loss_type=huber", "--huber_schedule=exponential",
                             "--timestep_bias_strategy=range", "--timestep_bias_begin=0",
                             "--timestep_bias_end=50", "--timestep_bias_multiplier=1000", "--flip_images"])
    result = train(config)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert len(records) == 4 and all(0 < r["loss"] < float("inf") for r in records)
    # a x1000 bias on [0, 50) holds 50000 / (50000 + 300) of the band: nearly every draw falls there
    assert sum(r["timestep_max"] < 50 for r in records) >= 3
    expert = json.loads((result.pipeline_dir / "expert.json").read_text())
    assert expert["training"]["adapter"] == "dora" and expert["training"]["loss_type"] == "huber"
    assert expert["training"]["flip_images"] is True
    weights = load_file(str(result.pipeline_dir / "pytorch_lora_weights.safetensors"))
    assert any("lora_magnitude_vector" in key for key in weights)
    run = json.loads((result.output_dir / "run.json").read_text())
    flat = {k: v for section in run["config"].values() for k, v in section.items()}
    assert (flat["loss_type"], flat["use_dora"], flat["flip_images"]) == ("huber", True, True)
    images = sum(bucket["images"] for bucket in run["buckets"])
    # each image and its mirror image, each its own entry (the plain ones may be cached already by earlier runs on
    # the shared test dataset; the mirrored ones are new to it or were made by another flipping run)
    assert run["cache"]["latents_encoded"] + run["cache"]["latents_reused"] == 2 * images


def test_a_full_fine_tune_with_the_optimizer_step_in_backward(tiny_model_dir: Path, small_dataset: Path,
                                                              tmp_path: Path) -> None:
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    flags = ["--env", str(env), *FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2",
             "--optimizer_release_gradients", "--max_grad_norm=0", "--checkpoint_step_interval=2"]
    config, _ = load_config([*flags, "--max_train_steps=2"])
    first = train(config)
    config, _ = load_config([*flags, "--max_train_steps=4", "--resume_from_checkpoint=latest",
                             "--allow_config_change"])
    result = train(config)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "grad_norm" not in records[-1]
    trained = load_file(str(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sum(not trained[k].equal(base[k]) for k in base) > 0.9 * len(base)
    assert first.output_dir == result.output_dir


def test_a_lora_expert_over_an_int8_base_loads_onto_the_ordinary_base(tiny_model_dir: Path, small_dataset: Path,
                                                                     tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=2", "--report_to=none",
                             "--validation_disable", "--train_batch_size=2", "--model_type=lora", "--lora_rank=4",
                             "--learning_rate=1e-2", "--base_model_precision=int8-torchao"])
    result = train(config)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert len(records) == 2 and all(0 < r["loss"] < float("inf") for r in records)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(result.pipeline_dir))  # float adapters, the ordinary float base
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_a_run_with_loss_masks_skips_and_lists_the_images_without_one(tiny_model_dir: Path, small_dataset: Path,
                                                                      tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    dataloader = json.loads(small_dataset.read_text())
    images = Path(next(e["instance_data_dir"] for e in dataloader if e.get("dataset_type", "image") == "image"))
    masks = tmp_path / "masks"
    masks.mkdir()
    names = sorted(p.name for p in images.glob("*.png"))
    for name in names[:-1]:  # the last image has no mask
        pixels = np.zeros((96, 96), dtype=np.uint8)
        pixels[:, :48] = 255
        Image.fromarray(pixels, "L").save(masks / name)
    for entry in dataloader:
        if entry.get("dataset_type", "image") == "image":
            entry["conditioning_data"] = "shape-masks"
    dataloader.append({"id": "shape-masks", "type": "local", "dataset_type": "conditioning",
                       "conditioning_type": "mask", "instance_data_dir": str(masks)})
    config_path = tmp_path / "dataloader.json"
    config_path.write_text(json.dumps(dataloader))
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", config_path)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=2", "--report_to=none",
                             "--validation_disable", "--train_batch_size=2", "--flip_images"])
    result = train(config)
    run = json.loads((result.output_dir / "run.json").read_text())
    skipped = [Path(entry["path"]).name for entry in run["skipped_images"]]
    assert skipped == [names[-1]] and "no mask" in run["skipped_images"][0]["reason"]
    assert run["cache"]["masks_encoded"] == len(names) - 1
    assert sum(bucket["images"] for bucket in run["buckets"]) == len(names) - 1
