"""The SDXL refiner layout: the tiny stand-in, the real layout's shape, and loading with its checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from expertune.errors import ModelError
from expertune.models.layouts import sdxl_refiner_layout
from expertune.models.sdxl import check_sdxl_layout, load_components
from expertune.models.tiny import POOLED_WIDTH, TEXT_ENCODER_2_WIDTH, TIME_EMBED_DIM, build_tiny_refiner


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_refiner_is_a_plain_img2img_pipeline_of_the_refiner_layout(tiny_refiner_dir: Path,
                                                                          tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    index = json.loads((tiny_refiner_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (tiny_refiner_dir / "text_encoder").exists() and not (tiny_refiner_dir / "tokenizer").exists()
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_dir), use_safetensors=True)
    unet = pipe.unet.config
    assert len(unet.down_block_types) == 4 and unet.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.cross_attention_dim == pipe.text_encoder_2.config.hidden_size == TEXT_ENCODER_2_WIDTH
    assert unet.projection_class_embeddings_input_dim == POOLED_WIDTH + 5 * TIME_EMBED_DIM
    # Shared with the tiny base when asked: the very same VAE, text encoder 2 and tokenizer 2 files.
    for shared in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors",
                   "tokenizer_2/tokenizer.json"):
        assert _digest(tiny_refiner_dir / shared) == _digest(tiny_model_dir / shared)
    # diffusers' own refiner call accepts it: five time ids with the aesthetic score fit the UNet.
    image = pipe("a red cube", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=4,
                 aesthetic_score=6.0, negative_aesthetic_score=2.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_tiny_refiner_draws_its_own_vae_unless_asked_and_is_seeded(tiny_refiner_dir: Path, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    alone = build_tiny_refiner(tmp_path / "alone", seed=1)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert _digest(alone / vae) != _digest(tiny_model_dir / vae)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _digest(alone / unet) == _digest(tiny_refiner_dir / unet)  # same seed, same UNet bytes
    assert _digest(build_tiny_refiner(tmp_path / "other", seed=2) / unet) != _digest(alone / unet)


def test_real_refiner_layout_has_the_published_shape() -> None:
    from diffusers import UNet2DConditionModel

    layout = sdxl_refiner_layout()
    assert layout.is_refiner and layout.text_encoder_1 is None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**layout.unet)
    assert 2.2e9 < sum(p.numel() for p in unet.parameters()) < 2.35e9  # "2.3B"
    assert unet.config.block_out_channels == (384, 768, 1536, 1536)
    # 2560 = pooled bigG 1280 + 5 time ids x 256: the aesthetic score replaces the target size.
    check_sdxl_layout(unet.config, None, 1280, 1280, "sdxl-refiner", requires_aesthetics_score=True)
    with pytest.raises(ModelError, match="1280 \\+ 6 x addition_time_embed_dim 256; it fits 5 time ids"):
        check_sdxl_layout(unet.config, 768, 1280, 1280, "sdxl-refiner")


def test_load_components_recognises_each_layout(tiny_refiner_dir: Path, tiny_model_dir: Path) -> None:
    refiner = load_components(str(tiny_refiner_dir))
    assert (refiner.layout_kind, refiner.requires_aesthetics_score, refiner.time_id_count) == ("refiner", True, 5)
    assert refiner.is_refiner and refiner.text_encoder_1 is None and refiner.tokenizer_1 is None
    assert refiner.tokenizers == (refiner.tokenizer_2,) and refiner.text_encoders == (refiner.text_encoder_2,)
    assert refiner.frozen_modules() == [refiner.vae, refiner.text_encoder_2]
    assert not any(p.requires_grad for p in refiner.text_encoder_2.parameters())
    base = load_components(str(tiny_model_dir), with_unet=False)
    assert (base.layout_kind, base.requires_aesthetics_score, base.time_id_count) == ("base", False, 6)
    assert len(base.text_encoders) == 2 and base.unet is None


def test_mismatched_refiner_models_are_refused_naming_the_fix(tiny_refiner_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from expertune.models.tiny import tiny_refiner_unet_config

    flag_off = tmp_path / "no-aesthetics"
    shutil.copytree(tiny_refiner_dir, flag_off)
    index = json.loads((flag_off / "model_index.json").read_text())
    (flag_off / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    with pytest.raises(ModelError, match="requires_aesthetics_score is not true.*set it to true"):
        load_components(str(flag_off), with_unet=False)

    wide = tmp_path / "wide-unet"
    shutil.copytree(tiny_refiner_dir, wide)
    shutil.rmtree(wide / "unet")
    UNet2DConditionModel(**tiny_refiner_unet_config(text_width=48)).save_pretrained(wide / "unet")
    with pytest.raises(ModelError, match=r"not an SDXL-refiner-layout model: unet cross_attention_dim 48 != text "
                                         r"encoder 2 width 32 \(the refiner layout has no text encoder 1\)"):
        load_components(str(wide), with_unet=False)
