"""Offloading a mixture's inactive experts: state moves in place (the optimizer steps on), and only switches move."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from expertune.train.offload import ActiveExpert, move_training_state, weights_on


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_moving_keeps_the_optimizer_bound_to_the_same_parameters_and_stepping_the_same() -> None:
    moved, moved_optimizer = _trained(0)
    kept, kept_optimizer = _trained(0)
    identities = [id(p) for p in moved.parameters()]
    move_training_state(moved, moved_optimizer, "cpu")
    assert [id(p) for p in moved.parameters()] == identities
    assert [id(p) for p in moved_optimizer.param_groups[0]["params"]] == identities
    for module, optimizer in ((moved, moved_optimizer), (kept, kept_optimizer)):
        torch.manual_seed(1)
        module(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(moved.parameters(), kept.parameters()))
    state = next(iter(moved_optimizer.state.values()))
    assert state["exp_avg"].device.type == "cpu" and state["step"].dim() == 0  # scalars stay where torch keeps them


def _run(offload: bool, count: int) -> SimpleNamespace:
    experts = []
    for k in range(count):
        module, optimizer = _trained(k)
        experts.append(SimpleNamespace(trained=module, optimizer=optimizer, index=k))
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), experts=experts,
                           config=SimpleNamespace(mixture=SimpleNamespace(mixture_offload_inactive=offload)))


def test_only_a_change_of_expert_moves_state() -> None:
    run = _run(True, 3)
    with ActiveExpert(run) as active:  # type: ignore[arg-type]
        for k in (0, 0, 1, 1, 1, 2, 0):
            assert active.take(run.experts[k]) is run.experts[k]
        assert active.switches == 4
    run = _run(False, 3)
    with ActiveExpert(run) as active:  # type: ignore[arg-type]
        for k in (0, 1, 2):
            active.take(run.experts[k])
        assert active.switches == 0 and not active.enabled


def test_weights_go_back_where_they_were_after_a_validation_even_when_it_fails() -> None:
    module, optimizer = _trained(0)
    before = [p.detach().clone() for p in module.parameters()]
    try:
        with weights_on([module], "cpu"):
            assert next(module.parameters()).device.type == "cpu"
            raise RuntimeError("a failing validation")
    except RuntimeError:
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in module.parameters()]
