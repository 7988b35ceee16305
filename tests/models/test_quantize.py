"""base_model_precision=int8-torchao (models/quantize.py): the frozen base's Linear weights in int8 under trainable
adapters; the values the stack cannot run are refused, with their reason, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.models.adapters import AdapterSpec
from expertune.models.lora import add_adapters
from expertune.models.quantize import precision_problem, quantize_frozen_base


def test_int8_base_predicts_like_the_float_base_and_trains_only_the_adapters(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, embeds, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)

    def predict() -> torch.Tensor:
        return unet(x, torch.tensor([100, 700]), encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    with torch.no_grad():
        reference = predict()
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    float_bytes = sum(m.weight.numel() * 4 for m in linears)
    assert quantize_frozen_base(unet, "int8-torchao") == len(linears)
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    int8_bytes = sum(m.weight.qdata.numel() + m.weight.scale.numel() * m.weight.scale.element_size() for m in linears)
    assert int8_bytes < 0.3 * float_bytes  # int8 data and one scale per output row
    with torch.no_grad():
        quantised = predict()
    error = (quantised - reference).norm() / reference.norm()
    assert 0 < float(error) < 0.05, float(error)
    assert add_adapters(unet, AdapterSpec("lora", 4, None, ("to_k", "to_q", "to_v", "to_out.0"))) > 0
    predict().pow(2).mean().backward()
    trained = {name for name, p in unet.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)


@pytest.mark.parametrize("flags, words", [
    (["--base_model_precision=int8-torchao"], "model_type=full trains every weight"),
    (["--model_type=lora", "--base_model_precision=nf4-bnb"], "bitsandbytes"),
    (["--model_type=lora", "--base_model_precision=fp8-torchao"], "compute capability 8.9"),
    (["--model_type=lora", "--base_model_precision=int8-quanto"], "optimum-quanto"),
    (["--model_type=lora", "--base_model_precision=int9"], "is not one of no_change, int8-torchao"),
])
def test_what_cannot_run_is_refused_before_any_model_loads(flags: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags, find_config=False)
    assert words in str(info.value) and "base_model_precision from command line" in str(info.value)


def test_int8_torchao_is_an_option() -> None:
    config, _ = load_config(["--model_type=lora", "--base_model_precision=int8-torchao"], find_config=False)
    assert config.model.base_model_precision == "int8-torchao"
    assert precision_problem("no_change", "full") is None


def test_the_backward_pass_keeps_the_int8_weight_not_a_float_copy() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_frozen_base(layer, "int8-torchao")
    weight = layer[0].weight
    x = torch.randn(3, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.numel() == 32 * 64 and t.dtype == torch.float32 for t in saved)  # no dequantised weight kept
    g = torch.randn_like(y)
    y.backward(g)
    reference = g @ weight.dequantize()
    assert torch.allclose(x.grad, reference, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight.dequantize(), layer[0].bias), atol=1e-5)
