"""How a run uses its device: TF32, bfloat16 where it is slow, torch.compile, bfloat16 weights.

Small functions the training loop calls once at start; each says what it did in one log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from expertune.config import Config
from expertune.errors import UnsupportedFeatureError

log = logging.getLogger(__name__)


def apply_tf32(allowed: bool, device: torch.device) -> bool:
    """Let float32 matmuls use TF32 on a CUDA device; returns whether it is on.

    cuDNN convolutions are left at PyTorch's own default (`torch.backends.cudnn.allow_tf32`, True): only the
    matmul setting is the option's, as in PyTorch, whose matmul default is full float32."""
    if device.type != "cuda":
        if allowed:
            log.info("allow_tf32: %s has no TF32 tensor cores; float32 maths stays float32", device.type)
        return False
    torch.backends.cuda.matmul.allow_tf32 = allowed
    if allowed:
        log.info("allow_tf32: float32 matmuls use TF32 tensor cores (cuDNN convolutions: PyTorch's default)")
    return allowed


def _matmul_seconds(dtype: torch.dtype, device: torch.device, size: int = 256, repeats: int = 3) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def bf16_slowdown(device: torch.device) -> float | None:
    """How many times slower a bfloat16 matmul is than a float32 one here, when bf16 is not native, else None.

    On CUDA, native means `torch.cuda.is_bf16_supported()`. On CPUs the answer is measured (a 256 x 256 matmul
    in each dtype): a CPU without bf16 kernels emulates it, often hundreds of times slower than float32.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return None
        return _matmul_seconds(torch.bfloat16, device) / _matmul_seconds(torch.float32, device)
    if device.type != "cpu":
        return None
    ratio = _matmul_seconds(torch.bfloat16, device) / _matmul_seconds(torch.float32, device)
    return ratio if ratio > 2.0 else None


def warn_if_bf16_is_slow(mixed_precision: str, device: torch.device) -> float | None:
    """One warning when bf16 autocast runs on a device without native bf16 (the run goes on); the ratio."""
    if mixed_precision != "bf16":
        return None
    ratio = bf16_slowdown(device)
    if ratio is not None:
        log.warning("mixed_precision=bf16 on %s, which has no native bfloat16 matmul: measured %.0fx slower than "
                    "float32 here. The run continues in bf16; use --mixed_precision=no (with --optimizer=adamw) "
                    "for speed on this machine", device.type, ratio)
    return ratio


def hold_weights_in_bf16(unet: torch.nn.Module, optimizer: str) -> bool:
    """adamw_bf16 trains bfloat16 weights with no float32 copy (SimpleTuner's pure bf16): cast the UNet."""
    if optimizer != "adamw_bf16":
        return False
    unet.to(torch.bfloat16)
    log.info("optimizer=adamw_bf16: the UNet's weights are held in bfloat16 (stochastic rounding and a "
             "compensation buffer keep small updates)")
    return True


def compile_unet(unet: torch.nn.Module, backend: str, device: torch.device) -> torch.nn.Module:
    """torch.compile the UNet's forward with the TorchDynamo `backend` ("no": unchanged).

    inductor builds C++ (CPU) or Triton (CUDA) kernels; where that toolchain is missing the run is refused at
    start, not at the first step, with what to do instead.
    """
    if backend == "no":
        return unet
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UnsupportedFeatureError(f"dynamo_backend={backend} is not a TorchDynamo backend of this torch "
                                      f"({torch.__version__}); use one of {', '.join(torch._dynamo.list_backends())} "
                                      "or no")
    if backend == "inductor":
        problem = _inductor_problem(device)
        if problem:
            raise UnsupportedFeatureError(f"dynamo_backend=inductor cannot run here: {problem}; set "
                                          "TRAINING_DYNAMO_BACKEND=no (--dynamo_backend=no) to train eagerly")
    if backend == "cudagraphs" and device.type != "cuda":
        raise UnsupportedFeatureError("dynamo_backend=cudagraphs needs a CUDA device; use --dynamo_backend=no")
    unet.compile(backend=backend)  # in place: parameter names and state_dict keys stay those of the plain UNet
    log.info("torch.compile: the UNet's forward is compiled with the %s backend (the first steps are slower)",
             backend)
    return unet


def _inductor_problem(device: torch.device) -> str | None:
    import shutil

    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "the Triton package is not installed (pip install triton)"
        return None
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++ or clang++) is on PATH"
    return None


def describe(config: Config) -> dict[str, Any]:
    """The device settings, as recorded in run.json."""
    m = config.model
    return {"mixed_precision": m.mixed_precision, "bf16_weights": config.train.optimizer == "adamw_bf16",
            "allow_tf32": m.allow_tf32, "dynamo_backend": m.dynamo_backend}
