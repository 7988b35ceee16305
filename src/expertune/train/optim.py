"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import torch

from expertune.config.schema import OPTIMIZERS
from expertune.errors import ConfigError, UnsupportedFeatureError

if TYPE_CHECKING:
    from expertune.config.schema import TrainConfig


def adamw_kernel(device: torch.device | None) -> dict[str, bool]:
    """torch AdamW's implementation for `device`: the fused kernel on CUDA (one launch per parameter group and
    dtype), the multi-tensor (foreach) one elsewhere, which on a CPU gives the for-loop's numbers exactly."""
    if device is not None and device.type == "cuda":
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(parameters: Iterable[torch.nn.Parameter], train: TrainConfig,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, over the trainable parameters, at `train.learning_rate`.

    The learning-rate schedule is applied on top (build_lr_scheduler) for all of them; Adafactor therefore
    runs with its own relative-step schedule switched off. `device`: where the parameters will train (the
    AdamW kernel is chosen for it, see `adamw_kernel`).
    """
    params = [p for p in parameters if p.requires_grad]
    name = train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                 weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
                                 **adamw_kernel(device))
    if name == "adamw_bf16":
        return _adamw_bf16(params, train)
    if name == "adamw8bit":
        return _adamw_8bit(params, train)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=train.learning_rate, weight_decay=train.adam_weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                       weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
                       use_bias_correction=True, safeguard_warmup=True)
    raise UnsupportedFeatureError(f"optimizer {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}")


def _adamw_bf16(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """SimpleTuner's `adamw_bf16` (its `--adam_bfloat16`), from the PyPI package it was vendored from.

    AdamW on bfloat16 weights with no float32 master copy: the first moment is accumulated with stochastic
    rounding, each update is added to a bfloat16 compensation buffer ("shift") and moved into the weight with
    stochastic rounding, so updates far below bfloat16's resolution are not lost; weight decay is applied in
    delayed lumps. Its denominator is bias-corrected, its first moment is not (as upstream).
    """
    from adamw_bf16 import AdamWBF16

    wrong = sorted({str(p.dtype) for p in params if p.dtype != torch.bfloat16})
    if wrong:
        raise UnsupportedFeatureError(f"--optimizer=adamw_bf16 updates bfloat16 weights only, got {', '.join(wrong)}; "
                                      "the trainer casts the UNet to bfloat16 before building it")
    return AdamWBF16(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                     weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)


def _adamw_8bit(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    try:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(
            params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
        )
    except Exception as error:  # ImportError, or a bitsandbytes build without a backend for this device
        raise UnsupportedFeatureError(
            f"--optimizer=adamw8bit needs bitsandbytes with a backend for this machine ({type(error).__name__}: "
            f"{error}). On a CUDA machine: pip install 'expertune[bnb]'. Elsewhere use --optimizer=adafactor, "
            "the memory-lean choice that needs no extra package"
        ) from None
    return optimizer


def sine_lr(step: int, peak: float, floor: float, period: int) -> float:
    """SimpleTuner's `sine` schedule (its config.env era): a wave between the midpoint and the peak.

    lr(step) = floor + (peak - floor) * (1 - cos(pi/2 + pi * (step mod T) / T)) / 2 with period T: it starts at
    the midpoint (peak + floor) / 2, reaches `peak` half-way through each period, returns to the midpoint and
    repeats; it never goes below the midpoint. (Upstream also truncates each value to 1e-9; not done here.)
    """
    phase = (step % period) / period
    return floor + (peak - floor) * (1.0 - math.cos(math.pi / 2 + math.pi * phase)) / 2.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int,
                       processes: int = 1) -> Any:
    """The schedule `train.lr_scheduler` names, in optimizer steps.

    diffusers' constant, constant_with_warmup, cosine, cosine_with_restarts (lr_num_cycles), linear and
    polynomial (to lr_end, power lr_power); and SimpleTuner's sine (`sine_lr`, period lr_warmup_steps). With
    several processes accelerate steps a prepared scheduler once per process each optimizer step, so the
    lengths are counted in scheduler steps (times `processes`), as SimpleTuner did.
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    warmup, total = train.lr_warmup_steps * processes, total_steps * processes
    if train.lr_scheduler == "sine":
        if warmup < 1:
            raise ConfigError("lr_scheduler=sine takes its period from lr_warmup_steps, which is 0: set "
                              "LR_WARMUP_STEPS (--lr_warmup_steps) to the period in steps, e.g. 1000")
        peaks = [group["lr"] for group in optimizer.param_groups]
        factors = [(lambda step, peak=peak: sine_lr(step, peak, train.lr_end, warmup) / peak)
                   for peak in peaks]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    if train.lr_scheduler == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, lr_end=train.lr_end, power=train.lr_power
        )
    if train.lr_scheduler == "cosine_with_restarts":
        return get_scheduler("cosine_with_restarts", optimizer=optimizer, num_warmup_steps=warmup,
                             num_training_steps=total, num_cycles=train.lr_num_cycles)
    return get_scheduler(
        train.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total
    )
