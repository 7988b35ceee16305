"""Community single-file checkpoints in: the shipped configs, the family detection, the refusal without
tokenizers, and the round trip (export as a single file, load and train from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertune.errors import ModelError
from expertune.models import layouts
from expertune.models.single_file import Parameterisation, pipeline_state_dict, save_single_file
from expertune.models.single_file_in import CONFIGS, family_of, materialise

VERSION_KEYS = ("_diffusers_version", "transformers_version")


def _json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VERSION_KEYS}


def test_shipped_configs_are_the_layouts() -> None:
    """The committed configs hold every entry of layouts.py (what `write_shipped_configs` writes from them and
    the class defaults) and a model_index of the family's pipeline class."""
    families = {"sdxl-base": layouts.sdxl_layout(), "ssd-1b": layouts.ssd1b_layout(),
                "sdxl-refiner": layouts.sdxl_refiner_layout()}
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == sorted(families)
    for family, layout in families.items():
        folder = CONFIGS / family
        for name, expected in (("unet", layout.unet), ("vae", layout.vae)):
            shipped = _json(folder / name / "config.json")
            assert {k: shipped[k] for k in expected} == json.loads(json.dumps(expected)), (family, name)
        encoders = [("text_encoder", layout.text_encoder_1), ("text_encoder_2", layout.text_encoder_2)]
        for name, shape in encoders:
            if shape is None:
                assert not (folder / name).exists()
                continue
            shipped = _json(folder / name / "config.json")
            assert (shipped["hidden_size"], shipped["num_hidden_layers"], shipped["num_attention_heads"],
                    shipped["intermediate_size"], shipped["projection_dim"], shipped["hidden_act"],
                    shipped["vocab_size"]) == (shape.width, shape.layers, shape.heads, shape.intermediate,
                                               shape.projection_dim, shape.hidden_act, shape.vocab_size)
        index = _json(folder / "model_index.json")
        assert index["_class_name"] == ("StableDiffusionXLImg2ImgPipeline" if layout.is_refiner
                                        else "StableDiffusionXLPipeline")
        assert _json(folder / "scheduler" / "scheduler_config.json")["beta_schedule"] == "scaled_linear"


@pytest.mark.parametrize("family, layout", [("sdxl-base", layouts.sdxl_layout), ("ssd-1b", layouts.ssd1b_layout),
                                            ("sdxl-refiner", layouts.sdxl_refiner_layout)])
def test_family_of_a_full_size_single_file(family: str, layout) -> None:
    """The keys a full-size checkpoint of each family has (built on `meta` from the shipped configs) name it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
        text_1 = (CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
                  if (folder / "text_encoder").is_dir() else None)
    assert json.loads(json.dumps(dict(unet.config)["transformer_layers_per_block"])) == \
        json.loads(json.dumps(layout().unet["transformer_layers_per_block"]))
    keys = set(pipeline_state_dict(unet, vae, text_1, text_2))
    assert family_of(keys) == family


def test_another_layout_is_refused() -> None:
    with pytest.raises(ModelError, match="not in the original SDXL layout"):
        family_of({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"})


def test_without_tokenizers_the_load_names_both_fixes(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    path = save_single_file(StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir)),
                            tmp_path / "tiny.safetensors", Parameterisation())
    with pytest.raises(ModelError, match=r"does not ship.*--single_file_config"):
        materialise(str(path), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "single_file").exists() or not any((tmp_path / "cache" / "single_file").iterdir())


def test_a_single_file_loads_as_the_model_it_was_written_from(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Round trip: the tiny pipeline as one file, loaded back by `load_components` (the exported folder as the
    config), holds the same weights; the conversion is kept and reused."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from expertune.models.sdxl import load_components

    path = save_single_file(StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir)),
                            tmp_path / "community.safetensors", Parameterisation())
    components = load_components(str(path), single_file_config=str(tiny_model_dir), cache_dir=tmp_path / "cache")
    assert Path(components.source).parent == tmp_path / "cache" / "single_file"
    original = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = components.unet.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    again = load_components(str(path), single_file_config=str(tiny_model_dir), cache_dir=tmp_path / "cache",
                            with_unet=False)
    assert again.source == components.source


@pytest.mark.integration
def test_train_from_a_single_file_checkpoint(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from helpers import FAST_FLAGS
    from expertune.config import load_config
    from expertune.expert_format import ExpertDescription
    from expertune.train.loop import train

    path = save_single_file(StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir)),
                            tmp_path / "community.safetensors", Parameterisation())
    config, _ = load_config([*FAST_FLAGS, "--max_train_steps=2", "--report_to=none", "--validation_disable",
                             f"--pretrained_model_name_or_path={path}", f"--single_file_config={tiny_model_dir}",
                             f"--data_backend_config={small_dataset}", f"--output_dir={tmp_path / 'out'}",
                             f"--cache_dir={tmp_path / 'cache'}", "--refiner_training",
                             "--refiner_training_strength=0.35"])
    result = train(config)
    description = ExpertDescription.read(result.pipeline_dir)
    assert description.base_model is not None and "single_file" in description.base_model
    assert (result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.integration  # builds three full-size UNets on `meta` (about 10 s)
def test_shipped_configs_are_what_write_shipped_configs_writes(tmp_path: Path) -> None:
    from expertune.models.single_file_in import write_shipped_configs

    write_shipped_configs(tmp_path)
    shipped = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.json"))
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json")) and len(shipped) == 17
    for relative in shipped:
        assert _json(CONFIGS / relative) == _json(tmp_path / relative), relative
