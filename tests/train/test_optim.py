from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expertune.errors import UnsupportedFeatureError
from expertune.train.checkpoint import DataPosition, TrainingState, load_checkpoint, save_checkpoint
from expertune.train.optim import build_optimizer


def _section(name: str, lr: float) -> SimpleNamespace:
    return SimpleNamespace(optimizer=name, learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=0.0, adam_epsilon=1e-8)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _step(model, optimizer, generator) -> float:
    x = torch.randn(32, 8, generator=generator)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


@pytest.mark.parametrize("name, lr, expected", [
    ("adamw", 1e-2, "AdamW"), ("adafactor", 1e-2, "Adafactor"), ("prodigy", 1.0, "Prodigy"),
])
def test_each_optimizer_learns_and_resumes_bit_for_bit(name: str, lr: float, expected: str, tmp_path: Path) -> None:
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    optimizer = build_optimizer([*model.parameters(), frozen], _section(name, lr))
    assert type(optimizer).__name__ == expected
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])
    generator = torch.Generator().manual_seed(0)
    losses = [_step(model, optimizer, generator) for _ in range(120)]
    assert sum(losses[-10:]) < 0.25 * sum(losses[:10])

    # The checkpoint format (safetensors + JSON, no pickle) carries each optimizer's state exactly.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = TrainingState(120, DataPosition(120, 0, 0), model, optimizer, scheduler, generator, [])
    path = save_checkpoint(tmp_path, state, {}, {})
    reference = [_step(model, optimizer, generator) for _ in range(3)]
    copy = _model(seed=1)
    copy_optimizer = build_optimizer(copy.parameters(), _section(name, lr))
    copy_state = TrainingState(0, DataPosition(0, 0, 0), copy, copy_optimizer,
                               torch.optim.lr_scheduler.LambdaLR(copy_optimizer, lambda s: 1.0),
                               torch.Generator(), [])
    load_checkpoint(path, copy_state)
    assert [_step(copy, copy_optimizer, copy_state.generator) for _ in range(3)] == reference


def test_adamw8bit_without_a_working_bitsandbytes_is_a_clear_error() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        if torch.cuda.is_available():
            pytest.skip("bitsandbytes and CUDA are both here: the optimizer builds, so there is no refusal to test")
    with pytest.raises(UnsupportedFeatureError, match="adamw8bit needs bitsandbytes.*--optimizer=adafactor"):
        build_optimizer(_model().parameters(), _section("adamw8bit", 1e-3))
