from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from expertune.errors import ModelError
from expertune.models.sdxl import check_sdxl_layout, load_components


def test_loads_the_tiny_model_with_frozen_encoders(tiny_model_dir: Path) -> None:
    parts = load_components(str(tiny_model_dir))
    assert parts.scheduler_class == "EulerDiscreteScheduler"
    assert parts.scheduler_config["num_train_timesteps"] == 1000
    assert not any(p.requires_grad for p in parts.text_encoder_2.parameters())
    assert not any(p.requires_grad for p in parts.vae.parameters())
    parts.release_text_encoders()
    assert parts.text_encoder_1 is None and parts.text_encoder_2 is None


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_components(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="no 'text_encoder/' folder"):
        load_components(str(tmp_path))


def test_an_sd15_shaped_unet_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    sd15 = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=4,
    )
    model = tmp_path / "sd15-shaped"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "unet")
    sd15.save_pretrained(model / "unet")
    with pytest.raises(ModelError, match="not an SDXL-layout model.*text_time"):
        load_components(str(model))
    with pytest.raises(ModelError, match="cross_attention_dim"):
        check_sdxl_layout(sd15.config, 16, 16, 32, "x")
