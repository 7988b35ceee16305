"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch

from expertune.config.schema import OPTIMIZERS
from expertune.errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from expertune.config.schema import TrainConfig


def build_optimizer(parameters: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, over the trainable parameters, at `train.learning_rate`.

    The learning-rate schedule is applied on top (build_lr_scheduler) for all of them; Adafactor therefore
    runs with its own relative-step schedule switched off.
    """
    params = [p for p in parameters if p.requires_grad]
    name = train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                 weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> Any:
    """diffusers' schedules: constant, constant_with_warmup, cosine, linear, polynomial (to lr_end)."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    warmup = train.lr_warmup_steps
    if train.lr_scheduler == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, lr_end=train.lr_end
        )
    return get_scheduler(
        train.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
