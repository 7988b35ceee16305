"""Offloading a mixture's inactive experts: state moves in place (the optimizer steps on), and only switches move."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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


# ---- the moves observed where they happen ------------------------------------------------------------

def test_moving_takes_weights_gradients_and_optimizer_state_onto_the_device() -> None:
    """The `meta` device is one a CPU-only test can see a tensor arrive on (a move to the CPU does nothing)."""
    module, optimizer = _trained(0)
    module(torch.randn(2, 4)).sum().backward()  # gradients present at the move
    move_training_state(module, optimizer, "meta")
    assert [p.device.type for p in module.parameters()] == ["meta", "meta"]
    assert [p.grad.device.type for p in module.parameters()] == ["meta", "meta"]
    for state in optimizer.state.values():
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"  # a 0-dim step count stays where torch keeps it


class _RecordedLinear(torch.nn.Linear):
    """A Linear that records where it is told to go (it still goes there)."""

    def __init__(self) -> None:
        super().__init__(4, 3)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(str(args[0] if args else kwargs["device"]))
        return super().to(*args, **kwargs)


def test_a_switch_moves_the_outgoing_expert_to_the_cpu_and_the_incoming_one_to_the_accelerator() -> None:
    accelerator = torch.device("cpu", 0)  # a device name distinct from "cpu", so each move's target is visible
    experts = []
    for k in range(3):
        module = _RecordedLinear()
        experts.append(SimpleNamespace(trained=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                                       index=k))
    run = SimpleNamespace(accelerator=SimpleNamespace(device=accelerator), experts=experts,
                          config=SimpleNamespace(mixture=SimpleNamespace(mixture_offload_inactive=True)))
    with ActiveExpert(run) as active:  # type: ignore[arg-type]
        assert [e.trained.moves for e in experts] == [["cpu"], ["cpu"], ["cpu"]]  # all off at the start
        active.take(experts[0])
        active.take(experts[0])  # the same expert again: nothing moves
        active.take(experts[2])
    assert [e.trained.moves for e in experts] == [["cpu", "cpu:0", "cpu"], ["cpu"], ["cpu", "cpu:0"]]
    single = SimpleNamespace(accelerator=run.accelerator, experts=experts[:1], config=run.config)
    with ActiveExpert(single) as active:  # type: ignore[arg-type]
        active.take(experts[0])  # one expert: offloading has nothing to do
    assert experts[0].trained.moves == ["cpu", "cpu:0", "cpu"]
    with weights_on([experts[1].trained], accelerator):  # validation: the weights go there and back
        assert experts[1].trained.moves == ["cpu", "cpu:0"]
    assert experts[1].trained.moves == ["cpu", "cpu:0", "cpu"]


def test_offloading_on_a_gpu_moves_state_off_and_on_in_place() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the accelerator variant of the offload moves needs one")
    module, optimizer = _trained(0)
    module(torch.randn(2, 4)).sum().backward()
    identities = [id(p) for p in module.parameters()]
    move_training_state(module, optimizer, "cuda")
    assert {p.device.type for p in module.parameters()} == {"cuda"} and [id(p) for p in module.parameters()] == identities
    assert {p.grad.device.type for p in module.parameters()} == {"cuda"}
    assert all(s["exp_avg"].device.type == "cuda" for s in optimizer.state.values())
    module(torch.randn(2, 4, device="cuda")).sum().backward()
    optimizer.step()  # the optimizer steps on the moved parameters
    move_training_state(module, optimizer, "cpu")
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert all(s["exp_avg"].device.type == "cpu" for s in optimizer.state.values())
    with weights_on([module], "cuda"):
        assert {p.device.type for p in module.parameters()} == {"cuda"}
    assert {p.device.type for p in module.parameters()} == {"cpu"}
