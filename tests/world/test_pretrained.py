"""The committed world model: every file as its manifest says, within the size limit, and as good as reported.

These load the committed weights through the same `from_pretrained` code path users take, and re-measure
the figures on fresh images (a few dozen, so the test stays fast).
"""

from __future__ import annotations

import json

import pytest
import torch

from expertune.world import PRETRAINED
from expertune.world.build import WEIGHTS_LIMIT_BYTES, verify_world
from expertune.world.scene import HELD_OUT, render, render_batch, scenes, training_combinations

MANIFEST = json.loads((PRETRAINED / "manifest.json").read_text())


def test_committed_files_match_the_manifest_and_the_size_limit() -> None:
    assert verify_world(PRETRAINED) == []
    weights = sum(e["bytes"] for name, e in MANIFEST["files"].items() if name.endswith(".safetensors"))
    assert weights == MANIFEST["weights_bytes"] <= WEIGHTS_LIMIT_BYTES
    assert MANIFEST["recipe_name"] == "full" and "expertune world build" in MANIFEST["command"]
    parts = {json.loads(line)["part"] for line in (PRETRAINED / "build_log.jsonl").read_text().splitlines()}
    assert parts == {"vae", "text_encoders", "unet", "eval_clip"}


def test_verify_names_a_changed_file(tmp_path) -> None:
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(PRETRAINED, copy)
    (copy / "base" / "model_index.json").write_text("{}")
    (copy / "extra.txt").write_text("x")
    problems = verify_world(copy)
    assert any(p.startswith("base/model_index.json: sha256") for p in problems)
    assert "extra.txt: not in the manifest" in problems


def test_base_is_an_epsilon_sdxl_pipeline_with_one_token_per_word() -> None:
    from expertune.models.sdxl import load_components

    components = load_components(str(PRETRAINED / "base"))
    assert components.scheduler_config["prediction_type"] == "epsilon"
    assert components.scheduler_config["timestep_spacing"] == "leading"
    assert components.scheduler_config["beta_schedule"] == "scaled_linear"
    assert components.unet.dtype == torch.float32  # fp16 on disk, float32 in training
    assert components.tokenizer_1.tokenize("a purple triangle") == ["a</w>", "purple</w>", "triangle</w>"]


@torch.no_grad()
def test_vae_reconstructs_fresh_images_at_the_reported_psnr() -> None:
    from diffusers import AutoencoderKL

    from expertune.world.vae import evaluate_vae

    vae = AutoencoderKL.from_pretrained(str(PRETRAINED / "base"), subfolder="vae", torch_dtype=torch.float32)
    images = render_batch(scenes(training_combinations()[::5], 1, seed=77) + scenes(list(HELD_OUT), 1, seed=78))
    figures = evaluate_vae(vae, images)
    assert figures["psnr_db"] >= MANIFEST["figures"]["vae"]["psnr_db"] - 1.5
    assert abs(figures["latent_std"] * vae.config.scaling_factor - 1) < 0.15


@torch.no_grad()
def test_evaluation_clip_names_fresh_images_among_all_captions() -> None:
    from transformers import CLIPModel, CLIPProcessor

    from expertune.world.clip import zero_shot_accuracy

    model = CLIPModel.from_pretrained(str(PRETRAINED / "clip"), dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(str(PRETRAINED / "clip"))
    drawn = scenes(training_combinations()[::3], 1, seed=79) + scenes(list(HELD_OUT), 1, seed=80)
    accuracy = zero_shot_accuracy(model, processor, [render(s) for s in drawn], [s.caption for s in drawn])
    # The reported figure, within the sampling error of 64 images; chance is 1 in 168.
    assert accuracy >= MANIFEST["figures"]["eval_clip"]["zero_shot_accuracy_held_out_images"] - 0.12
