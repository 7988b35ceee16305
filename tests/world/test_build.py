"""The builder cannot rot: a miniature build (a few steps of every part) through the same code as the real one."""

from __future__ import annotations

import pytest

import json
from pathlib import Path

import torch

from expertune.cli import main
from expertune.world.build import MINIATURE, verify_world
from expertune.world.scene import training_combinations


@pytest.mark.integration
def test_miniature_build_writes_a_verified_world_model(tmp_path: Path) -> None:
    out = tmp_path / "world"
    assert main(["world", "build", str(out), "--recipe", "miniature"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert verify_world(out) == []
    assert {"base/model_index.json", "base/unet/diffusion_pytorch_model.safetensors", "clip/config.json",
            "base/tokenizer/tokenizer.json", "build_log.jsonl"} <= set(manifest["files"])
    assert set(manifest["figures"]) == set(manifest["seconds"]) - {"from_nothing", "this_invocation"} == {"vae", "text_encoders", "unet", "eval_clip"}
    assert manifest["figures"]["unet"]["steps"] == MINIATURE.unet.steps
    # The base UNet was trained by `expertune train`: its loss rows are in the build log.
    rows = [json.loads(line) for line in (out / "build_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["part"] == "unet"] == [1, 2, 3]
    # Weights are stored in fp16 and the result loads as a plain diffusers pipeline.
    from safetensors import safe_open

    with safe_open(str(out / "base" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in list(weights.keys())[:5]} == {torch.float16}
    assert main(["world", "verify", str(out)]) == 0
    (out / "clip" / "config.json").write_text("{}")
    assert main(["world", "verify", str(out)]) == 1


def test_parts_are_deterministic_on_the_cpu() -> None:
    from expertune.world.vae import VaeRecipe, train_vae

    recipe = VaeRecipe(crop_steps=2, full_steps=1, crop_batch=2, full_batch=2)
    first, _ = train_vae(training_combinations(), recipe)
    second, _ = train_vae(training_combinations(), recipe)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
