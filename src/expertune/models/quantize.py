"""A quantised frozen base under LoRA experts (SimpleTuner's `base_model_precision`).

`int8-torchao`: every `nn.Linear` of the frozen UNet (attention projections, feed-forwards, embeddings' linears)
holds its weight in int8 with one scale per output row (torchao's `Int8WeightOnlyConfig`), about a quarter of
float32's bytes and half of bfloat16's; convolutions and norms stay as they are. The adapters peft adds on a
quantised Linear (`TorchaoLoraLinear`) train in full precision on top of it; only they are saved, so the exported
expert loads onto the ordinary base model. It runs on the CPU and on CUDA (torchao's weight-only int8 kernels).

The other values SimpleTuner offers are refused, each with its reason (`REFUSED`): they need a package or kernel
this stack lacks.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import Any

import torch

BASE_PRECISIONS = ("no_change", "int8-torchao")
TORCHAO_VERSION = "0.18.0"
REFUSED: dict[str, str] = {
    "fp8-torchao": "torchao's float8 training kernels need a CUDA GPU of compute capability 8.9 or newer; use "
                   "int8-torchao",
    "int4-torchao": "torchao's int4 weight-only kernels need CUDA; use int8-torchao",
    "nf4-bnb": "bitsandbytes' 4-bit kernels need a CUDA GPU and bitsandbytes, which expertune does not install; "
               "use int8-torchao",
    "int8-quanto": "optimum-quanto is not part of expertune's pinned stack; use int8-torchao",
    "int4-quanto": "optimum-quanto is not part of expertune's pinned stack; use int8-torchao",
    "int2-quanto": "optimum-quanto is not part of expertune's pinned stack; use int8-torchao",
    "fp8-quanto": "optimum-quanto is not part of expertune's pinned stack; use int8-torchao",
    "fp8uz-quanto": "optimum-quanto is not part of expertune's pinned stack; use int8-torchao",
}

log = logging.getLogger(__name__)


def precision_problem(precision: str, model_type: str) -> str | None:
    """Why `base_model_precision=precision` cannot run (None: it can); no model or package is loaded."""
    if precision == "no_change":
        return None
    if precision in REFUSED:
        return f"base_model_precision={precision} is not supported: {REFUSED[precision]}"
    if precision not in BASE_PRECISIONS:
        return (f"base_model_precision={precision!r} is not one of {', '.join(BASE_PRECISIONS)} (SimpleTuner's other "
                f"values, refused with their reason: {', '.join(REFUSED)})")
    if model_type != "lora":
        return (f"base_model_precision={precision} quantises the frozen base under LoRA experts, but model_type="
                f"{model_type} trains every weight: set model_type=lora, or base_model_precision=no_change")
    if importlib.util.find_spec("torchao") is None:
        return (f"base_model_precision={precision} needs torchao: pip install 'torchao=={TORCHAO_VERSION}' (or "
                "expertune[quant])")
    return None


def quantize_frozen_base(unet: Any, precision: str) -> int:
    """Quantise the frozen UNet's Linear weights in place (before the adapters are added); returns how many."""
    if precision == "no_change":
        return 0
    if precision != "int8-torchao":
        raise ValueError(f"base_model_precision {precision!r} is not one of {BASE_PRECISIONS}")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # its import logs: see expertune/__init__.py

    unet.requires_grad_(False)
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    quantize_(unet, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    for module in linears:
        module.forward = types.MethodType(_frozen_linear_forward, module)
    log.info("base_model_precision=int8-torchao: %d Linear layers of the frozen UNet hold int8 weights", len(linears))
    return len(linears)


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with a frozen quantised W that autograd does not keep dequantised: torchao's int8 linear
    dequantises W inside the op, and autograd would save that float copy of every weight for the backward pass
    (measured: a peak above a float32 base's). Here only the int8 weight is kept; the backward pass dequantises it
    again to give the input's gradient (the weight and bias are frozen: no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = ctx.weight.dequantize().to(grad.dtype)
        return grad @ weight, None, None


def _frozen_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _FrozenQuantizedLinear.apply(x, self.weight, self.bias)
