"""A CUDA out-of-memory or other accelerator error, said in one line: the settings in use and those that would fit.

`accelerator_errors(config, doing)` wraps a verb's work; torch's `OutOfMemoryError` (CUDA, and the MPS backend's
out-of-memory RuntimeError) and `AcceleratorError` (device-side asserts, launch failures) leave it as an
`AcceleratorFailure` (exit code 4) whose cause keeps the traceback for `expertune -v`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from expertune.config import Config
from expertune.errors import AcceleratorFailure

# Optimizers whose state is already small: no advice to switch.
_LEAN_OPTIMIZERS = ("adamw8bit", "adafactor", "adamw_bf16")


def in_use(config: Config) -> str:
    """The settings that decide the memory a training step takes, in words."""
    d, m, t = config.data, config.model, config.train
    return (f"train_batch_size={t.train_batch_size}, resolution={d.resolution:g} ({d.resolution_type}), "
            f"mixed_precision={m.mixed_precision}, model_type={m.model_type}, optimizer={t.optimizer}, "
            f"gradient_checkpointing={str(t.gradient_checkpointing).lower()}")


def what_would_fit(config: Config) -> list[str]:
    """The options that lower the memory of a step, most effective first, leaving out those already set."""
    d, m, t = config.data, config.model, config.train
    advice = []
    if not t.gradient_checkpointing:
        advice.append("--gradient_checkpointing")
    if t.train_batch_size > 1:
        half = t.train_batch_size // 2
        advice.append(f"--train_batch_size={half} --gradient_accumulation_steps="
                      f"{t.gradient_accumulation_steps * t.train_batch_size // half} (the same samples per step)")
    if m.mixed_precision == "no":
        advice.append("--mixed_precision=bf16")
    if t.optimizer not in _LEAN_OPTIMIZERS:
        advice.append("--optimizer=adamw8bit (8-bit Adam state)")
    if m.model_type == "full":
        advice.append("--model_type=lora (adapters instead of the full UNet)")
    if config.mixture.mixture_boundaries and not config.mixture.mixture_offload_inactive:
        advice.append("--mixture_offload_inactive")
    if t.use_ema and t.ema_device != "cpu":
        advice.append("--ema_device=cpu")
    if d.resolution > 512:
        advice.append(f"a lower --resolution than {d.resolution:g}")
    return advice


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def failure_message(config: Config, doing: str, error: BaseException) -> str:
    """The one line of an accelerator error raised while `doing` (e.g. "training")."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _is_out_of_memory(error):
        fits = what_would_fit(config)
        advice = ("; to fit, try " + ", ".join(fits)) if fits else "; every memory-saving option is already on: " \
            "use a GPU with more memory or a smaller model"
        return (f"the accelerator ran out of memory while {doing} ({first}) with {in_use(config)}{advice}. "
                "Run `expertune -v ...` for the traceback")
    return (f"the accelerator failed while {doing} ({type(error).__name__}: {first}) with {in_use(config)}; "
            "rerun with CUDA_LAUNCH_BLOCKING=1 and `expertune -v ...` for the traceback of the failing operation")


@contextmanager
def accelerator_errors(config: Config, doing: str) -> Iterator[None]:
    """Turn an accelerator error raised inside into an AcceleratorFailure naming the settings and the fix."""
    try:
        yield
    except torch.AcceleratorError as error:
        raise AcceleratorFailure(failure_message(config, doing, error)) from error
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        raise AcceleratorFailure(failure_message(config, doing, error)) from error
