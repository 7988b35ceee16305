"""Exponential moving average of the trained weights, optionally kept in CPU memory.

diffusers' `EMAModel` updates shadow weights on the parameters' own device; keeping them in host memory
(to spare accelerator memory on SDXL-size UNets) needs the update to copy each parameter over, which is
the one thing this small class adds. The update is one multi-tensor `_foreach_lerp_` over every parameter. The decay follows EMAModel's default warm-up, so the two agree.
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
        self._staging: list[torch.Tensor] | None = None  # page-locked host copies of GPU weights (ema_device cpu)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        """One update over all parameters with torch's multi-tensor (`_foreach`) kernels: a few kernel launches
        instead of one per parameter. Parameters held elsewhere or in another dtype are copied over first."""
        weights = [p.detach() for p in parameters]
        if len(weights) != len(self.shadow):
            raise ValueError(f"EMA update got {len(weights)} parameters for {len(self.shadow)} shadow weights")
        self.updates += 1
        decay = ema_decay(self.updates, self.max_decay)
        if self.device.type == "cpu" and weights and weights[0].device.type == "cuda":
            weights = self._staged(weights)
        elif any(w.device != self.device or w.dtype != torch.float32 for w in weights):
            weights = [w.to(self.device, torch.float32) for w in weights]
        if weights:
            torch._foreach_lerp_(self.shadow, weights, 1.0 - decay)
        return decay

    def _staged(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """GPU weights copied into page-locked host buffers (allocated once) in one batch of asynchronous copies,
        then one wait: with `--ema_device cpu` the copy is the update's cost, and pageable copies are slower."""
        if self._staging is None or len(self._staging) != len(weights):
            self._staging = [torch.empty(w.shape, dtype=w.dtype, pin_memory=True) for w in weights]
        torch._foreach_copy_(self._staging, weights, non_blocking=True)
        torch.cuda.current_stream(weights[0].device).synchronize()
        return [w.float() for w in self._staging]

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
