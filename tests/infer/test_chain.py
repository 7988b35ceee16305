"""Chained generation through the saved experts: ours, and the recipe's own inference snippet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from expertune.cli import main
from expertune.errors import ConfigError
from expertune.infer.chain import check_chain, generate, read_expert

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`


def test_recipe_inference_snippet_runs_on_the_two_experts(trained_experts) -> None:
    """The seed's snippet, on CPU in float32 with few steps and local paths."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UniPCMultistepScheduler

    stage1, stage2 = trained_experts
    training_refiner_strength = 0.35
    base_model_power = 1 - training_refiner_strength
    num_inference_steps = 10
    stage_1_model_id, stage_2_model_id = str(stage1.pipeline_dir), str(stage2.pipeline_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(stage_1_model_id, add_watermarker=False, torch_dtype=torch.float32).to("cpu")
    pipe.scheduler = UniPCMultistepScheduler.from_pretrained(stage_1_model_id, subfolder="scheduler")
    img2img_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(stage_2_model_id).to(device="cpu", dtype=torch.float32)
    img2img_pipe.scheduler = UniPCMultistepScheduler.from_pretrained(stage_1_model_id, subfolder="scheduler")
    prompt = "An astronaut riding a green horse"
    use_zsnr = True
    image = pipe(
        prompt=prompt, num_inference_steps=num_inference_steps, denoising_end=base_model_power,
        guidance_scale=9.2, guidance_rescale=0.7 if use_zsnr else 0.0, output_type="latent", height=64, width=64,
    ).images
    assert image.shape[1] == 4  # latents handed over, not pixels
    image = img2img_pipe(
        prompt=prompt, num_inference_steps=num_inference_steps, denoising_start=base_model_power,
        guidance_scale=9.2, guidance_rescale=0.7 if use_zsnr else 0.0, image=image,
    ).images[0]
    assert image.size == (64, 64)
    # The saved scheduler carries the trained parameterisation into the snippet's scheduler.
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr is True


def test_generate_chains_experts_in_band_order(trained_experts, tmp_path: Path) -> None:
    stage1, stage2 = trained_experts
    # Given in the wrong order on purpose: the chain is ordered by band.
    chain = check_chain([read_expert(stage2.output_dir), read_expert(stage1.output_dir)])
    assert [e.band.lo for e in chain] == [350, 0]
    out = tmp_path / "chained.png"
    code = main(["generate", "--expert", str(stage2.output_dir), "--expert", str(stage1.pipeline_dir),
                 "--prompt", "a red circle", "--steps", "6", "--guidance", "3", "--guidance_rescale", "0.7",
                 "--height", "64", "--width", "64", "--out", str(out)])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    first = generate([stage1.output_dir, stage2.output_dir], "a red circle", num_inference_steps=6, seed=1,
                     height=64, width=64)
    again = generate([stage1.output_dir, stage2.output_dir], "a red circle", num_inference_steps=6, seed=1,
                     height=64, width=64)
    assert list(first.getdata()) == list(again.getdata())


def _copy_with(expert_dir: Path, destination: Path, **changes) -> Path:
    shutil.copytree(expert_dir, destination)
    info = json.loads((destination / "expert.json").read_text())
    info.update(changes)
    (destination / "expert.json").write_text(json.dumps(info))
    return destination


def test_chain_guard_refuses_gaps_and_mixed_parameterisations(trained_experts, tmp_path: Path, capsys) -> None:
    stage1, stage2 = trained_experts
    low = _copy_with(stage2.pipeline_dir, tmp_path / "low", timestep_range=[0, 299])
    with pytest.raises(ConfigError, match=r"gap \[300, 349\]"):
        check_chain([read_expert(stage1.pipeline_dir), read_expert(low)])
    epsilon = _copy_with(stage2.pipeline_dir, tmp_path / "eps", prediction_type="epsilon")
    with pytest.raises(ConfigError, match="prediction_type.*'v_prediction'.*'epsilon'"):
        check_chain([read_expert(stage1.pipeline_dir), read_expert(epsilon)])
    code = main(["generate", "--expert", str(stage1.pipeline_dir), "--expert", str(low), "--prompt", "x",
                 "--out", str(tmp_path / "never.png")])
    assert code == 2 and not (tmp_path / "never.png").exists()
    assert "bands [0, 299] and [350, 999] leave a gap [300, 349]" in capsys.readouterr().err
    code = main(["generate", "--expert", str(stage1.pipeline_dir), "--expert", str(epsilon), "--prompt", "x",
                 "--out", str(tmp_path / "never.png")])
    error = capsys.readouterr().err
    assert code == 2 and "prediction_type" in error and "'v_prediction'" in error and "'epsilon'" in error


def test_generate_several_images_with_guidance_per_expert_and_a_chosen_scheduler(trained_experts,
                                                                                 tmp_path: Path) -> None:
    from PIL import Image

    stage1, stage2 = trained_experts
    out = tmp_path / "many.png"
    code = main(["generate", "--expert", str(stage2.output_dir), "--expert", str(stage1.output_dir),
                 "--prompt", "a red circle", "--negative_prompt", "blurry", "--steps", "6",
                 "--guidance", "2", "--guidance", "6", "--guidance_rescale", "0.7", "--scheduler", "dpm++",
                 "--num_images", "3", "--seed", "4", "--height", "64", "--width", "64", "--out", str(out)])
    assert code == 0
    singles = [Image.open(tmp_path / f"many_{i:02d}.png") for i in range(3)]
    assert all(image.size == (64, 64) for image in singles)
    assert Image.open(out).size == (128, 128)  # a 2 x 2 grid of three
    assert np.array_equal(np.asarray(Image.open(out).crop((64, 0, 128, 64))), np.asarray(singles[1]))
    # Image i starts from the noise of seed S + i; guidance is given in --expert order (stage 2: 2, stage 1: 6).
    alone = generate([stage2.output_dir, stage1.output_dir], "a red circle", negative_prompt="blurry",
                     num_inference_steps=6, guidance_scale=[2, 6], guidance_rescale=0.7, scheduler="dpm++",
                     seed=5, height=64, width=64)
    difference = np.abs(np.asarray(alone, dtype=float) - np.asarray(singles[1], dtype=float))
    assert difference.mean() < 1.0
    swapped = generate([stage2.output_dir, stage1.output_dir], "a red circle", negative_prompt="blurry",
                       num_inference_steps=6, guidance_scale=[6, 2], guidance_rescale=0.7, scheduler="dpm++",
                       seed=5, height=64, width=64)
    assert not np.array_equal(np.asarray(swapped), np.asarray(alone))
    euler = generate([stage2.output_dir, stage1.output_dir], "a red circle", negative_prompt="blurry",
                     num_inference_steps=6, guidance_scale=[2, 6], guidance_rescale=0.7, scheduler="euler",
                     seed=5, height=64, width=64)
    assert not np.array_equal(np.asarray(euler), np.asarray(alone))


def test_generate_refuses_guidance_counts_that_do_not_match_the_experts(trained_experts, tmp_path: Path,
                                                                        capsys) -> None:
    stage1, stage2 = trained_experts
    code = main(["generate", "--expert", str(stage1.output_dir), "--expert", str(stage2.output_dir),
                 "--prompt", "x", "--guidance", "1", "--guidance", "2", "--guidance", "3",
                 "--out", str(tmp_path / "never.png")])
    assert code == 2 and "--guidance was given 3 times for 2 experts" in capsys.readouterr().err
    assert not (tmp_path / "never.png").exists()
