"""The builder cannot rot: a miniature build (a few steps of every part) through the same code as the real one."""

from __future__ import annotations

import pytest

import dataclasses
import json
from pathlib import Path

import torch

from expertune.cli import main
from expertune.world.build import FULL, MINIATURE, reusable_parts, verify_world
from expertune.world.scene import training_combinations


@pytest.mark.integration
def test_miniature_build_writes_a_verified_world_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
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
    # A build that takes every part from this one (--reuse) writes the very same files.
    again = tmp_path / "again"
    assert main(["world", "build", str(again), "--recipe", "miniature", "--reuse", str(out)]) == 0
    rebuilt = json.loads((again / "manifest.json").read_text())
    assert rebuilt["files"] == manifest["files"] and rebuilt["figures"] == manifest["figures"]
    assert rebuilt["lent_parts"] == ["vae", "text_encoders", "unet", "eval_clip"] and manifest["lent_parts"] == []
    (out / "clip" / "config.json").write_text("{}")
    assert main(["world", "verify", str(out)]) == 1
    capsys.readouterr()
    assert main(["world", "build", str(again), "--recipe", "miniature", "--reuse", str(out)]) == 2
    assert "does not match its manifest (clip/config.json: sha256" in capsys.readouterr().err
    assert verify_world(again) == []  # the refused build left the earlier output as it was


def test_reuse_lends_only_unchanged_parts_whose_dependants_are_unchanged() -> None:
    earlier = json.loads(json.dumps(dataclasses.asdict(FULL)))
    assert reusable_parts(earlier, FULL) == ["vae", "text_encoders", "unet", "eval_clip"]
    assert reusable_parts(earlier, dataclasses.replace(FULL, eval_clip=dataclasses.replace(FULL.eval_clip, steps=9))) \
        == ["vae", "text_encoders", "unet"]
    # A new UNet recipe retrains the UNet from the fp32 VAE and encoders: they are rebuilt too, not lent.
    assert reusable_parts(earlier, dataclasses.replace(FULL, unet=dataclasses.replace(FULL.unet, steps=9))) \
        == ["eval_clip"]
    assert reusable_parts(earlier, dataclasses.replace(FULL, vae=dataclasses.replace(FULL.vae, seed=9))) \
        == ["eval_clip"]
    assert reusable_parts({}, FULL) == []
    # A recipe field added since the earlier build reads as its default there; set to anything else, it is new.
    older = json.loads(json.dumps(earlier))
    del older["text_encoders"]["radius_range"]
    assert reusable_parts(older, FULL) == ["vae", "text_encoders", "unet", "eval_clip"]
    assert reusable_parts(older, dataclasses.replace(
        FULL, text_encoders=dataclasses.replace(FULL.text_encoders, radius_range=(0.2, 0.4)))) == ["eval_clip"]


def test_parts_are_deterministic_on_the_cpu() -> None:
    from expertune.world.vae import VaeRecipe, train_vae

    recipe = VaeRecipe(crop_steps=2, full_steps=1, crop_batch=2, full_batch=2)
    first, _ = train_vae(training_combinations(), recipe)
    second, _ = train_vae(training_combinations(), recipe)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
