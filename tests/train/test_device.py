"""Device settings of a run: TF32, the bf16 slowdown warning, torch.compile and its refusals, bf16 weights."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from expertune.errors import UnsupportedFeatureError
from expertune.train import device


def test_tf32_only_applies_to_cuda() -> None:
    assert device.apply_tf32(True, torch.device("cpu")) is False


def test_bf16_without_native_support_warns_once_with_the_measured_slowdown(monkeypatch, caplog) -> None:
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype, dev, **_: 3.0 if dtype == torch.bfloat16 else 0.01)
    with caplog.at_level(logging.WARNING, logger="expertune.train"):
        ratio = device.warn_if_bf16_is_slow("bf16", torch.device("cpu"))
        assert device.warn_if_bf16_is_slow("no", torch.device("cpu")) is None
    assert ratio == pytest.approx(300)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "300x slower than float32" in warnings[0] and "continues" in warnings[0]
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype, dev, **_: 0.01)
    assert device.warn_if_bf16_is_slow("bf16", torch.device("cpu")) is None  # native: nothing to say


def test_compile_refusals_are_clear(monkeypatch) -> None:
    module = torch.nn.Linear(2, 2)
    assert device.compile_unet(module, "no", torch.device("cpu")) is module
    with pytest.raises(UnsupportedFeatureError, match="cudagraphs needs a CUDA device"):
        device.compile_unet(module, "cudagraphs", torch.device("cpu"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UnsupportedFeatureError, match="no C\\+\\+ compiler.*TRAINING_DYNAMO_BACKEND=no"):
        device.compile_unet(module, "inductor", torch.device("cpu"))


def test_compile_keeps_parameter_names_and_results() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    x = torch.randn(3, 4)
    expected = module(x)
    names = list(module.state_dict())
    compiled = device.compile_unet(module, "eager", torch.device("cpu"))
    assert compiled is module and list(module.state_dict()) == names
    assert torch.allclose(module(x), expected)


def test_adamw_bf16_holds_the_weights_in_bf16() -> None:
    module = torch.nn.Linear(2, 2)
    assert device.hold_weights_in_bf16(module, "adamw") is False and module.weight.dtype == torch.float32
    assert device.hold_weights_in_bf16(module, "adamw_bf16") is True and module.weight.dtype == torch.bfloat16
