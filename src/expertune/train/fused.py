"""The optimizer step in the backward pass (SimpleTuner's `optimizer_release_gradients`; kohya's and OneTrainer's
"fused backward pass"): each parameter is stepped by its own optimizer as soon as its gradient is complete
(`Tensor.register_post_accumulate_grad_hook`), and its gradient is freed at once. The full set of gradients never
exists, so the peak memory of a full fine-tune drops by up to one copy of the trained weights.

The maths is the usual optimizer's: AdamW, Adafactor and the bf16 AdamW update each parameter from its own
gradient and state only, so stepping them one by one gives the same weights (`tests/train/test_fused.py`). What it
cannot do is anything that needs every gradient before the first step: gradient accumulation over micro-batches,
clipping by the global norm, optimizers with global statistics (Prodigy), and DDP / FSDP / DeepSpeed (the hook
would see a gradient before it is reduced across processes). Those combinations are refused by the config check.

`StepInBackward` is a `torch.optim.Optimizer` whose `param_groups` are the per-parameter optimizers' own groups
(the same dicts), so a learning-rate scheduler built on it drives them all; its `step` and `zero_grad` do nothing
(the work was done in backward), and its state dict has the usual layout (one entry per parameter), so checkpoints
save and resume it like any optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from expertune.config.knobs_check import PER_PARAMETER_OPTIMIZERS  # noqa: F401  (the optimizers it accepts)


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per trained parameter, stepped by a post-accumulate-grad hook during backward."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter],
                 make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> None:
        trained = [p for p in parameters if p.requires_grad]
        if not trained:
            raise ValueError("no trainable parameters")
        self.optimizers = [make_optimizer([p]) for p in trained]
        self.enabled = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(child))
                       for p, child in zip(trained, self.optimizers)]
        groups = [group for child in self.optimizers for group in child.param_groups]
        # Optimizer.__init__ would copy the groups; keep the children's own dicts so the scheduler reaches them.
        super().__init__([{"params": group["params"]} for group in groups], {})
        self.param_groups = groups

    def _hook(self, child: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(parameter: torch.Tensor) -> None:
            if self.enabled and parameter.grad is not None:
                child.step()
                parameter.grad = None  # freed now, not at the end of the step

        return step

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Nothing: every parameter was stepped as its gradient arrived."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: gradients are freed in backward."""

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        """The usual layout: `state[i]` and `param_groups[i]` of the i-th trained parameter."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        for index, child in enumerate(self.optimizers):
            own = child.state_dict()
            if 0 in own["state"]:
                state[index] = own["state"][0]
            groups.append({**own["param_groups"][0], "params": [index]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"the state holds {len(groups)} parameters, this optimizer trains {len(self.optimizers)}")
        states = state_dict["state"]
        for index, child in enumerate(self.optimizers):
            own_state = {0: states[index]} if index in states else {}
            child.load_state_dict({"state": own_state, "param_groups": [{**groups[index], "params": [0]}]})
        self.param_groups = [group for child in self.optimizers for group in child.param_groups]
