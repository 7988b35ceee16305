"""Exponential moving average of the trained weights, optionally kept in CPU memory.

diffusers' `EMAModel` updates shadow weights on the parameters' own device; keeping them in host memory
(to spare accelerator memory on SDXL-size UNets) needs the update to copy each parameter over, which is
the one thing this small class adds. The decay follows EMAModel's default warm-up, so the two agree.
"""

from __future__ import annotations

from typing import Iterable

import torch


def ema_decay(update: int, max_decay: float) -> float:
    """Decay used by the `update`-th update (1-based): (1 + n) / (10 + n) with n = update - 1, capped.

    Matches diffusers EMAModel.get_decay without warm-up power: 0 on the first update (shadow = weights).
    """
    n = update - 1
    if n <= 0:
        return 0.0
    return min((1 + n) / (10 + n), max_decay)


class ExponentialMovingAverage:
    """shadow ← decay · shadow + (1 - decay) · weights, over the trainable parameters."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float, device: str | torch.device):
        self.device = torch.device(device)
        self.max_decay = max_decay
        self.updates = 0
        self.shadow = [p.detach().to(self.device, copy=True).float() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        self.updates += 1
        decay = ema_decay(self.updates, self.max_decay)
        for shadow, param in zip(self.shadow, parameters, strict=True):
            shadow.lerp_(param.detach().to(self.device, torch.float32), 1.0 - decay)
        return decay

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow.to(param.device, param.dtype))

    def state_dict(self) -> dict:
        return {"updates": self.updates, "max_decay": self.max_decay, "shadow_params": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow_params"]) != len(self.shadow):
            raise ValueError("EMA state holds a different number of parameters than the model")
        self.updates = int(state["updates"])
        self.shadow = [t.to(self.device, torch.float32) for t in state["shadow_params"]]
