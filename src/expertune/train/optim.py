"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from expertune.errors import UnsupportedFeatureError


def build_optimizer(parameters: Iterable[torch.nn.Parameter], train: Any) -> torch.optim.Optimizer:
    """AdamW from the run's `train` config section (other optimizers arrive with their issue)."""
    name = train.optimizer
    if name not in ("adamw", "adamw_torch"):
        raise UnsupportedFeatureError(f"optimizer {name!r} is not supported yet; use --optimizer=adamw")
    return torch.optim.AdamW(
        [p for p in parameters if p.requires_grad],
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: Any, total_steps: int) -> Any:
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
