"""The original single-file SDXL layout: key round trips through diffusers' own reader, markers, load-back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertune.models import layouts
from expertune.models.single_file import (
    BIGG_PREFIX,
    CLIP_L_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Parameterisation,
    save_single_file,
    unet_to_original,
    vae_to_original,
)


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("config", [layouts.sdxl_unet_config, layouts.ssd1b_unet_config,
                                    layouts.sdxl_refiner_unet_config], ids=["sdxl", "ssd-1b", "refiner"])
def test_full_size_unet_keys_round_trip_through_diffusers_reader(config) -> None:
    """Every parameter of a full-size UNet (built on `meta`, no weights) maps to an original key, and diffusers'
    original→diffusers conversion brings each back to the same name and shape."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _meta_unet(config())
    state = unet.state_dict()
    original = unet_to_original(state, unet.config.layers_per_block)
    assert len(original) == len(state)
    assert all(not key.startswith(("down_blocks", "up_blocks", "mid_block")) for key in original)
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in original.items()}, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


def test_full_size_sdxl_unet_names_known_original_keys() -> None:
    """Facts of the SDXL checkpoint layout: the 10-deep transformer of the lowest resolution sits at input block 7,
    the mid transformer at middle_block.1, the last upsampler after a transformer at output_blocks.2.2."""
    unet = _meta_unet(layouts.sdxl_unet_config())
    original = unet_to_original(unet.state_dict(), 2)
    for key in ("input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", "input_blocks.3.0.op.weight",
                "middle_block.1.proj_in.weight", "middle_block.2.in_layers.0.weight", "label_emb.0.0.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "out.2.weight",
                "output_blocks.8.0.skip_connection.weight"):
        assert key in original, key


def test_ssd1b_mid_block_without_attention_is_one_resnet_at_middle_block_0() -> None:
    """SSD-1B's mid block has no transformer and one resnet (ComfyUI: transformer_depth_middle -1)."""
    unet = _meta_unet(layouts.ssd1b_unet_config())
    original = unet_to_original(unet.state_dict(), 2)
    mids = {".".join(k.split(".")[:2]) for k in original if k.startswith("middle_block")}
    assert mids == {"middle_block.0"}


def test_full_size_vae_keys_round_trip_through_diffusers_reader() -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = layouts.sdxl_vae_config()
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    state = vae.state_dict()
    original = vae_to_original(state, len(config["up_block_types"]))
    assert original["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in original  # diffusers' last up block is the original's first
    assert "decoder.up.3.upsample.conv.weight" in original and "decoder.up.0.upsample.conv.weight" not in original
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in original.items()}, config)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


def _images(pipeline, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipeline("a red circle", num_inference_steps=3, height=64, width=64, generator=generator,
                    output_type="pt").images


def test_tiny_pipeline_single_file_loads_back_with_same_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    path = save_single_file(pipeline, tmp_path / "expert.safetensors", Parameterisation())
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
        in_proj = handle.get_tensor(BIGG_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert in_proj.shape[0] == 3 * in_proj.shape[1]
    assert CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight" in keys
    assert "v_pred" not in keys and not path.with_suffix(".yaml").exists()
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_model_dir), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(back, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    torch.testing.assert_close(_images(back), _images(pipeline))


def test_refiner_single_file_loads_back(tiny_refiner_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_dir))
    path = save_single_file(pipeline, tmp_path / "refiner.safetensors", Parameterisation())
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
        assert "conditioner.embedders.0.model.text_projection" in set(handle.keys())
    back = StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(tiny_refiner_dir),
                                                             local_files_only=True)
    for name in ("unet", "vae", "text_encoder_2"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(back, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_v_prediction_markers_precision_and_a1111_yaml(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    marks = Parameterisation("v_prediction", zero_terminal_snr=True, timestep_range=(0, 349))
    path = save_single_file(pipeline, tmp_path / "v.safetensors", marks, precision="fp16")
    with safe_open(str(path), "pt") as handle:
        assert handle.get_tensor("v_pred").numel() == 0 and handle.get_tensor("ztsnr").numel() == 0
        assert handle.get_tensor(UNET_PREFIX + "out.2.weight").dtype == torch.float16
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["modelspec.timestep_range"] == "0,349"
    assert metadata["modelspec.zero_terminal_snr"] == "true"
    yaml_text = path.with_suffix(".yaml").read_text()
    assert 'parameterization: "v"' in yaml_text
    assert not list(tmp_path.glob(".*partial"))
    eps_only = save_single_file(pipeline, tmp_path / "v_no_z.safetensors", Parameterisation("v_prediction"))
    with safe_open(str(eps_only), "pt") as handle:
        assert "v_pred" in set(handle.keys()) and "ztsnr" not in set(handle.keys())
    json.dumps(metadata)  # strings only, as safetensors metadata must be
