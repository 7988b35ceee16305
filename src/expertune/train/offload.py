"""Which expert of a joint job sits on the accelerator (`--mixture_offload_inactive`).

A mixture job holds every expert's UNet and optimizer state. With offloading on, only the expert whose turn
it is stays on the accelerator: at a switch the outgoing expert's weights, gradients and optimizer state move
to CPU memory and the incoming one's move onto the accelerator, so the accelerator holds one expert's
training state however many experts there are (the frozen VAE and cached embeddings are shared). Switches
cost a host-device copy of one expert's state each way; `--mixture_switch_every` sets how often they happen.
On a CPU-only machine both places are the same and nothing moves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch

from expertune.train.setup import ExpertRun, Run

log = logging.getLogger(__name__)


def move_training_state(module: torch.nn.Module, optimizer: Any, device: torch.device | str) -> None:
    """Move `module`'s parameters (and their gradients) and every tensor of `optimizer`'s per-parameter state to
    `device`, in place: the optimizer keeps its parameter identities, so it steps on as before."""
    module.to(device)
    for parameter in module.parameters():
        if parameter.grad is not None:
            parameter.grad = parameter.grad.to(device)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for state in inner.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = value.to(device)


class ActiveExpert:
    """Hands out the expert that trains next, moving experts on and off the accelerator when offloading."""

    def __init__(self, run: Run) -> None:
        self.device = run.accelerator.device
        self.enabled = run.config.mixture.mixture_offload_inactive and len(run.experts) > 1
        self.experts = run.experts
        self.active: ExpertRun | None = None
        self.switches = 0

    def __enter__(self) -> ActiveExpert:
        if self.enabled:
            for expert in self.experts:
                move_training_state(expert.trained, expert.optimizer, "cpu")
            log.info("offloading inactive experts to CPU memory (mixture_offload_inactive)")
        return self

    def take(self, expert: ExpertRun) -> ExpertRun:
        if self.enabled and expert is not self.active:
            if self.active is not None:
                move_training_state(self.active.trained, self.active.optimizer, "cpu")
            move_training_state(expert.trained, expert.optimizer, self.device)
            self.switches += 1
        self.active = expert
        return expert

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        # Experts stay where their last turn left them: the export reads weights from any device, and the final
        # validation brings the weights onto the accelerator itself (`weights_on`), never the optimizer state.
        return None


@contextmanager
def weights_on(modules: Sequence[torch.nn.Module], device: torch.device | str) -> Iterator[None]:
    """Within the block, `modules` (their weights only: no optimizer state) are on `device`; afterwards each is
    back where it was. Validation uses it when offloading keeps the inactive experts in CPU memory: the chain
    needs every expert's UNet on the accelerator at once."""
    homes = [next(module.parameters()).device for module in modules]
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)
