"""SimpleTuner's sine schedule, schedules under several processes, and the bfloat16 AdamW (adamw_bf16)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expertune.errors import ConfigError, UnsupportedFeatureError
from expertune.train.checkpoint import DataPosition, TrainingState, load_checkpoint, save_checkpoint
from expertune.train.optim import build_lr_scheduler, build_optimizer, sine_lr


def _section(**overrides):
    values = dict(optimizer="adamw", learning_rate=8e-7, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                  adam_epsilon=1e-8, lr_scheduler="sine", lr_warmup_steps=8, lr_end=4e-7, lr_power=1.0,
                  lr_num_cycles=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def _run(scheduler, optimizer, steps: int, per_step: int = 1) -> list[float]:
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        for _ in range(per_step):  # accelerate steps a prepared scheduler once per process
            scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def test_sine_matches_simpletuners_formula_midpoint_peak_midpoint_periodic() -> None:
    lr, floor, period = 8e-7, 4e-7, 8
    mid = (lr + floor) / 2
    assert sine_lr(0, lr, floor, period) == pytest.approx(mid)
    assert sine_lr(period // 2, lr, floor, period) == pytest.approx(lr)
    assert sine_lr(period, lr, floor, period) == pytest.approx(mid)  # a new period starts at the midpoint
    for step in range(3 * period):
        expected = floor + (lr - floor) * (1 - math.cos(math.pi / 2 + math.pi * (step % period) / period)) / 2
        assert sine_lr(step, lr, floor, period) == pytest.approx(expected, rel=1e-12)
        assert mid - 1e-18 <= sine_lr(step, lr, floor, period) <= lr + 1e-18
    section = _section()
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    values = _run(build_lr_scheduler(optimizer, section, total_steps=24), optimizer, 24)
    assert values == pytest.approx([sine_lr(s, lr, floor, period) for s in range(25)], rel=1e-9)


def test_sine_needs_a_period() -> None:
    section = _section(lr_warmup_steps=0)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    with pytest.raises(ConfigError, match="LR_WARMUP_STEPS"):
        build_lr_scheduler(optimizer, section, total_steps=10)


@pytest.mark.parametrize("name", ["sine", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_two_processes_follow_the_one_process_schedule_per_optimizer_step(name: str) -> None:
    section = _section(lr_scheduler=name, lr_warmup_steps=2)
    one = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    two = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    single = _run(build_lr_scheduler(one, section, total_steps=8), one, 8)
    double = _run(build_lr_scheduler(two, section, total_steps=8, processes=2), two, 8, per_step=2)
    assert double == pytest.approx(single, rel=1e-9)


def test_cosine_with_restarts_restarts_lr_num_cycles_times() -> None:
    section = _section(lr_scheduler="cosine_with_restarts", lr_warmup_steps=0, lr_num_cycles=2, learning_rate=1.0)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], section)
    values = _run(build_lr_scheduler(optimizer, section, total_steps=8), optimizer, 7)
    assert values[0] == pytest.approx(1.0) and values[4] == pytest.approx(1.0)  # restart half-way
    assert values[3] < 0.2 and values[7] < 0.2


# ---- adamw_bf16 -------------------------------------------------------------------------------


def _bf16_weights(value: float, n: int = 256) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full((n,), value, dtype=torch.bfloat16))


def _descend(param, optimizer, steps: int, generator) -> None:
    for _ in range(steps):
        target = torch.zeros(param.shape)
        noise = 0.1 * torch.randn(param.shape, generator=generator)
        param.grad = ((param.float() - target) + noise).to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_bf16_keeps_updates_far_below_bf16_resolution() -> None:
    """lr 1e-4 on weights of 1.0 (bf16 spacing there: 2^-7 = 0.0078): plain torch AdamW on bf16 weights loses
    every update; adamw_bf16 (compensation buffer + stochastic rounding) follows the float32 AdamW."""
    steps, lr = 300, 1e-4
    section = _section(optimizer="adamw_bf16", learning_rate=lr)
    bf16, naive, fp32 = _bf16_weights(1.0), _bf16_weights(1.0), torch.nn.Parameter(torch.ones(256))
    optimizers = [build_optimizer([bf16], section), torch.optim.AdamW([naive], lr=lr, weight_decay=0.0),
                  torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0)]
    assert type(optimizers[0]).__name__ == "AdamWBF16"
    for param, optimizer in zip((bf16, naive, fp32), optimizers):
        torch.manual_seed(0)  # the stochastic rounding draws from torch's generator
        _descend(param, optimizer, steps, torch.Generator().manual_seed(0))
    moved_fp32 = 1.0 - fp32.detach().mean().item()
    assert moved_fp32 == pytest.approx(steps * lr, rel=0.1)  # Adam moves about lr per step here
    assert naive.detach().float().mean().item() == 1.0  # every update rounded away
    true_bf16 = bf16.detach().float() + optimizers[0].state[bf16]["shift"].float()  # weight + owed shift
    assert 1.0 - true_bf16.mean().item() == pytest.approx(moved_fp32, rel=0.1)  # no bias correction of m (upstream)
    assert 1.0 - bf16.detach().float().mean().item() == pytest.approx(moved_fp32, rel=0.15)


def test_adamw_bf16_refuses_float32_weights() -> None:
    with pytest.raises(UnsupportedFeatureError, match="bfloat16 weights only"):
        build_optimizer([torch.nn.Parameter(torch.ones(3))], _section(optimizer="adamw_bf16"))


def test_adamw_bf16_state_survives_a_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    section = _section(optimizer="adamw_bf16", learning_rate=1e-3, adam_weight_decay=1e-2)
    optimizer = build_optimizer(model.parameters(), section)
    generator = torch.Generator().manual_seed(0)

    def step(m, o, g) -> torch.Tensor:
        x = torch.randn(16, 8, generator=g).to(torch.bfloat16)
        m(x).float().pow(2).mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)
        return torch.cat([p.detach().float().flatten() for p in m.parameters()])

    for _ in range(5):
        step(model, optimizer, generator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, TrainingState(5, DataPosition(5, 0, 0), model, optimizer, scheduler,
                                                   generator, []), {}, {})
    reference = [step(model, optimizer, generator) for _ in range(3)]
    copy = torch.nn.Linear(8, 4).to(torch.bfloat16)
    copy_optimizer = build_optimizer(copy.parameters(), section)
    state = TrainingState(0, DataPosition(0, 0, 0), copy, copy_optimizer,
                          torch.optim.lr_scheduler.LambdaLR(copy_optimizer, lambda s: 1.0), torch.Generator(), [])
    load_checkpoint(path, state)  # restores torch's RNG too: the stochastic rounding repeats exactly
    again = [step(copy, copy_optimizer, state.generator) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
