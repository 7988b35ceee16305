"""A base-layout expert chained into a refiner-layout expert, against diffusers' own base → refiner snippet."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from expertune.cli import main
from expertune.errors import ConfigError
from expertune.expert_format import ExpertDescription
from expertune.experts import ExpertBand
from expertune.infer.chain import expert_layout_kind, generate, read_expert
from expertune.models.sdxl import read_scheduler_config
from expertune.schedule import NoiseSchedule

HANDOFF = 0.65  # base: t >= 350, refiner: t < 350


def _as_expert(model: Path, destination: Path, band: ExpertBand) -> Path:
    """A saved model made into an expert directory (untrained, but chained exactly like a trained one)."""
    shutil.copytree(model, destination)
    schedule = NoiseSchedule.from_scheduler_config(read_scheduler_config(destination))
    ExpertDescription(band, schedule.describe(), base_model=str(model)).write(destination)
    return destination


@pytest.fixture(scope="module")
def experts(tiny_model_dir: Path, tiny_refiner_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("refiner-chain")
    return (_as_expert(tiny_model_dir, root / "base", ExpertBand(350, 999)),
            _as_expert(tiny_refiner_dir, root / "refiner", ExpertBand(0, 349)))


def test_chain_equals_diffusers_base_then_refiner(experts) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base_dir, refiner_dir = experts
    assert [expert_layout_kind(read_expert(d)) for d in experts] == ["base", "refiner"]
    prompt, steps, seed = "a red circle", 8, 3
    base = StableDiffusionXLPipeline.from_pretrained(str(base_dir), use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_dir), use_safetensors=True)
    assert refiner.config.requires_aesthetics_score and refiner.text_encoder is None
    generator = torch.Generator().manual_seed(seed)
    latents = base(prompt, num_inference_steps=steps, denoising_end=HANDOFF, output_type="latent", height=64,
                   width=64, guidance_scale=5.0, generator=generator).images
    expected = refiner(prompt, image=latents, num_inference_steps=steps, denoising_start=HANDOFF,
                       guidance_scale=5.0, generator=generator, output_type="np").images[0]
    # Given in the wrong order on purpose: the chain orders by band.
    ours = generate([refiner_dir, base_dir], prompt, num_inference_steps=steps, guidance_scale=5.0, seed=seed,
                    height=64, width=64, device="cpu")
    # The same image, bit for bit (diffusers' own PIL conversion of its float output).
    assert np.array_equal(np.asarray(ours), (expected * 255).round().astype(np.uint8))
    # The refiner's own conditioning reached it: another aesthetic score, another image.
    other = generate([base_dir, refiner_dir], prompt, num_inference_steps=steps, guidance_scale=5.0, seed=seed,
                     height=64, width=64, device="cpu", aesthetic_score=1.0, negative_aesthetic_score=9.0)
    assert not np.array_equal(np.asarray(other), np.asarray(ours))


def test_generate_verb_chains_a_refiner_and_refuses_a_refiner_at_the_top(experts, tiny_refiner_dir: Path,
                                                                          tmp_path: Path, capsys) -> None:
    from PIL import Image

    base_dir, refiner_dir = experts
    out = tmp_path / "chained.png"
    code = main(["generate", "--expert", str(base_dir), "--expert", str(refiner_dir), "--prompt", "a red circle",
                 "--steps", "4", "--aesthetic_score", "7", "--height", "64", "--width", "64", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0 and Image.open(out).size == (64, 64)

    top = _as_expert(tiny_refiner_dir, tmp_path / "refiner-top", ExpertBand(350, 999))
    low = _as_expert(base_dir, tmp_path / "base-low", ExpertBand(0, 349))
    with pytest.raises(ConfigError, match="SDXL refiner layout .* cannot start a chain from pure noise"):
        generate([top, low], "x", num_inference_steps=4, height=64, width=64, device="cpu")
    code = main(["generate", "--expert", str(top), "--expert", str(low), "--prompt", "x", "--steps", "4",
                 "--device", "cpu", "--out", str(tmp_path / "never.png")])
    assert code == 2 and "cannot start a chain from pure noise" in capsys.readouterr().err
    assert not (tmp_path / "never.png").exists()
