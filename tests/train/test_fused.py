"""optimizer_release_gradients (train/fused.py): per-parameter steps in backward give the usual optimizer's weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.train.fused import StepInBackward
from expertune.train.optim import build_lr_scheduler, build_optimizer


def _train(name: str, **overrides: object) -> SimpleNamespace:
    values = dict(optimizer=name, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                  adam_epsilon=1e-8, lr_scheduler="linear", lr_warmup_steps=2, lr_end=0.0, lr_power=1.0,
                  lr_num_cycles=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def _steps(unet, optimizer, scheduler, steps: int) -> list[float]:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 4, 8, 8, generator=g)
        embeds, pooled = torch.randn(2, 77, 48, generator=g), torch.randn(2, 32, generator=g)
        ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        out = unet(x, torch.tensor([100, 800]), encoder_hidden_states=embeds,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_step_in_backward_gives_the_usual_weights(name: str, tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    train = _train(name)
    usual = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").train()
    fused = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").train()
    optimizer = build_optimizer(usual.parameters(), train)
    in_backward = StepInBackward(fused.parameters(), lambda params: build_optimizer(params, train))
    a = _steps(usual, optimizer, build_lr_scheduler(optimizer, train, 5), 5)
    b = _steps(fused, in_backward, build_lr_scheduler(in_backward, train, 5), 5)
    assert a == pytest.approx(b, rel=1e-5)
    assert all(p.grad is None for p in fused.parameters())  # freed in backward
    assert in_backward.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])  # the schedule too
    moved = 0
    base = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").state_dict()
    for (key, p), q in zip(usual.state_dict().items(), fused.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), key
        moved += int(not torch.equal(p, base[key]))
    assert moved > 0.9 * len(base)


def test_its_state_dict_resumes(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    train = _train("adamw")
    first = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").train()
    optimizer = StepInBackward(first.parameters(), lambda params: build_optimizer(params, train))
    _steps(first, optimizer, build_lr_scheduler(optimizer, train, 5), 2)
    state = optimizer.state_dict()
    assert len(state["param_groups"]) == len(list(first.parameters())) and set(state["state"][0]) >= {"exp_avg"}
    second = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").train()
    second.load_state_dict(first.state_dict())
    resumed = StepInBackward(second.parameters(), lambda params: build_optimizer(params, train))
    resumed.load_state_dict(state)
    for a, b in zip(optimizer.optimizers, resumed.optimizers):
        assert torch.equal(a.state_dict()["state"][0]["exp_avg"], b.state_dict()["state"][0]["exp_avg"])
    assert resumed.param_groups[5] is resumed.optimizers[5].param_groups[0]


@pytest.mark.parametrize("flags, words", [
    (["--optimizer=prodigy"], "optimizer=prodigy"),
    (["--gradient_accumulation_steps=2", "--max_grad_norm=0"], "gradient_accumulation_steps=2"),
    ([], "max_grad_norm=1.0"),
    (["--max_grad_norm=0", "--num_processes=2"], "several processes"),
])
def test_what_needs_every_gradient_first_is_refused(flags: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["--optimizer_release_gradients", *flags], find_config=False)
    assert "optimizer_release_gradients (from command line) cannot run with" in str(info.value)
    assert words in str(info.value)
