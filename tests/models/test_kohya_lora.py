"""LoRA experts in the kohya / ComfyUI layout, read back by diffusers' own kohya reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertune.expert_format import ExpertDescription
from expertune.experts import ExpertBand
from expertune.models.kohya_lora import save_kohya_lora
from expertune.models.lora import LORA_WEIGHTS, add_lora_adapters, save_lora_expert


@pytest.fixture(scope="module")
def lora_expert(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA expert (rank 4, alpha 8) with random, non-zero up weights on attention and a resnet conv, and the
    images of the adapted pipeline in memory."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    add_lora_adapters(pipe.unet, 4, 8, 0.0, "to_k,to_q,to_v,to_out.0,conv1")
    generator = torch.Generator().manual_seed(0)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    destination = tmp_path_factory.mktemp("lora") / "lora"
    saved = save_lora_expert(pipe.unet, pipe.scheduler, ExpertDescription(ExpertBand(0, 349, 1000),
                                                                          model_type="lora"), destination)
    return saved, _images(pipe)


def _images(pipe) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(1)).images


def test_kohya_lora_loads_in_diffusers_like_the_trained_adapters(lora_expert: tuple[Path, torch.Tensor],
                                                                 tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder, expected = lora_expert
    path = save_kohya_lora(folder / LORA_WEIGHTS, tmp_path / "expert_lora.safetensors", layers_per_block=2)
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys  # a resnet's conv1
    assert float(alpha) == 8.0

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    plain = _images(pipe)
    pipe.load_lora_weights(str(path))
    converted = _images(pipe)
    assert (expected - plain).abs().max() > 1e-3, "the adapters change the output"
    torch.testing.assert_close(converted, expected, atol=1e-4, rtol=1e-4)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(folder))  # the diffusers folder itself, conv adapters included
    torch.testing.assert_close(_images(pipe), expected, atol=1e-4, rtol=1e-4)
