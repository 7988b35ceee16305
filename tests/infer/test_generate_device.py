"""`expertune generate` on the accelerator when there is one: --device / --dtype, fp32 VAE, one load per expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertune.cli import build_parser
from expertune.errors import ConfigError
from expertune.infer import chain
from expertune.infer.chain import _PipelineLoader, generate, read_expert, resolve_device, resolve_dtype


def test_defaults_are_the_gpu_in_half_precision_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["generate", "--expert", "x", "--prompt", "p"])
    assert (args.device, args.dtype) == ("auto", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cuda:1") == torch.float16 and resolve_dtype("bf16", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if not (torch.backends.mps.is_available()):
        assert resolve_device("auto") == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    args = build_parser().parse_args(["generate", "--expert", "x", "--prompt", "p", "--device", "cpu",
                                      "--dtype", "fp16"])
    assert (args.device, args.dtype) == ("cpu", "fp16")


def test_half_precision_keeps_a_force_upcast_vae_in_float32(tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL

    loader = _PipelineLoader(torch.float16, "cpu")
    pipe = loader._pipeline(tiny_model_dir)
    assert pipe.unet.dtype == torch.float16
    force_upcast = AutoencoderKL.load_config(str(tiny_model_dir), subfolder="vae").get("force_upcast", False)
    assert pipe.vae.dtype == (torch.float32 if force_upcast else torch.float16)


@pytest.mark.integration
def test_each_expert_is_loaded_once_and_a_mixed_dtype_chain_decodes(trained_experts,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    stage1, stage2 = trained_experts
    loads: list[str] = []
    real = chain._PipelineLoader._pipeline

    def counting(self, source):
        loads.append(str(source))
        pipe = real(self, source)
        pipe.vae.to(torch.float32)  # as force_upcast does under fp16: the VAE's dtype differs from the UNet's
        return pipe

    monkeypatch.setattr(chain._PipelineLoader, "_pipeline", counting)
    image = generate([stage2.output_dir, stage1.output_dir], "a red circle", num_inference_steps=4, height=64,
                     width=64, device="cpu", dtype=torch.bfloat16)
    assert image.size == (64, 64)
    assert sorted(loads) == sorted(str(read_expert(p).path) for p in (stage1.output_dir, stage2.output_dir))
