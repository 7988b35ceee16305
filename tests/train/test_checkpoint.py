"""Checkpoints: atomic, complete, exactly restorable, and refusing silent config changes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from expertune.errors import ConfigError
from expertune.train.checkpoint import (
    DataPosition,
    TrainingState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from expertune.train.ema import ExponentialMovingAverage
from expertune.train.resume_check import check_resume_compatible


def _state(seed: int = 0, ema: bool = True) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    generator = torch.Generator().manual_seed(seed)
    average = ExponentialMovingAverage(model.parameters(), 0.9, "cpu") if ema else None
    return TrainingState(0, DataPosition(0, 0, 0), model, optimizer, scheduler, generator, [2, 0, 1], average)


def _train_steps(state: TrainingState, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(5, 3, generator=state.generator)
        loss = state.unet(x).pow(2).mean()
        loss.backward()
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad()
        if state.ema is not None:
            state.ema.update(state.unet.parameters())
        state.step += 1
        state.data = DataPosition(state.step, 0, state.step)


def test_roundtrip_continues_bit_for_bit(tmp_path: Path) -> None:
    reference = _state()
    _train_steps(reference, 6)

    first = _state()
    _train_steps(first, 3)
    path = save_checkpoint(tmp_path, first, {"train": {"seed": 0}}, {"items": 3})
    assert path.name == "checkpoint-3"
    resumed = _state(seed=99)  # different init and RNG: everything must come from the checkpoint
    load_checkpoint(path, resumed)
    assert resumed.step == 3 and resumed.data == DataPosition(3, 0, 3) and resumed.epoch_order == [2, 0, 1]
    _train_steps(resumed, 3)
    for a, b in zip(reference.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(reference.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    assert reference.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()
    assert torch.equal(reference.generator.get_state(), resumed.generator.get_state())


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path, caplog) -> None:
    state = _state(ema=False)
    for _ in range(3):
        _train_steps(state, 1)
        save_checkpoint(tmp_path, state, {}, {})
    root = tmp_path / "checkpoints"
    (root / ".checkpoint-9.abc.partial").mkdir()  # a write that a crash interrupted
    damaged = root / "checkpoint-7"
    damaged.mkdir()
    (damaged / "state.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-3"
    assert "partial checkpoint" in caplog.text and "damaged checkpoint" in caplog.text
    assert resolve_checkpoint(tmp_path, "checkpoint-2").name == "checkpoint-2"
    with pytest.raises(ConfigError, match="available: checkpoint-1, checkpoint-2, checkpoint-3"):
        resolve_checkpoint(tmp_path, "checkpoint-7")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere", "latest")


def test_config_changes_are_refused_or_accepted_explicitly(tmp_path: Path) -> None:
    saved = {"band": {"refiner_training_strength": 0.35}, "train": {"train_batch_size": 8, "max_train_steps": 10},
             "validation": {"validation_prompt": "a"}}
    document = {"config": saved, "run_identity": {"training_items_digest": "x"}}
    changed = {"band": {"refiner_training_strength": 0.3}, "train": {"train_batch_size": 4, "max_train_steps": 10},
               "validation": {"validation_prompt": "a"}}
    with pytest.raises(ConfigError) as info:
        check_resume_compatible(document, changed, {"training_items_digest": "x"}, True, tmp_path)
    assert "refiner_training_strength: 0.35 -> 0.3" in str(info.value)
    assert "train_batch_size: 8 -> 4" in str(info.value)
    with pytest.raises(ConfigError, match="datasets or model changed"):
        check_resume_compatible(document, saved, {"training_items_digest": "y"}, True, tmp_path)
    harmless = {"band": saved["band"], "train": {"train_batch_size": 8, "max_train_steps": 20},
                "validation": {"validation_prompt": "b"}}
    with pytest.raises(ConfigError, match="--allow_config_change"):
        check_resume_compatible(document, harmless, {"training_items_digest": "x"}, False, tmp_path)
    accepted = check_resume_compatible(document, harmless, {"training_items_digest": "x"}, True, tmp_path)
    assert accepted == ["max_train_steps: 10 -> 20", "validation_prompt: 'a' -> 'b'"]


def test_optimizer_state_with_tensors_anywhere_round_trips(tmp_path: Path) -> None:
    """Some optimizers (bitsandbytes, Prodigy) keep tensors in their groups or nested state."""
    state = _state(ema=False)
    _train_steps(state, 2)
    state.optimizer.param_groups[0]["extra_tensor"] = torch.tensor([1.5, 2.5])
    state.optimizer.state[state.optimizer.param_groups[0]["params"][0]]["nested"] = {"scale": torch.ones(2), "n": 3}
    path = save_checkpoint(tmp_path, state, {}, {})
    restored = _state(seed=5, ema=False)
    restored.optimizer.param_groups[0]["extra_tensor"] = torch.zeros(2)
    load_checkpoint(path, restored)
    assert torch.equal(restored.optimizer.param_groups[0]["extra_tensor"], torch.tensor([1.5, 2.5]))
    first = restored.optimizer.state[restored.optimizer.param_groups[0]["params"][0]]
    assert torch.equal(first["nested"]["scale"], torch.ones(2)) and first["nested"]["n"] == 3
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))  # no pickle formats


def test_a_checkpoint_resumes_only_under_the_engine_layout_that_wrote_it(tmp_path: Path) -> None:
    from expertune.train.strategy import FullySharded

    state = _state()
    _train_steps(state, 1)
    path = save_checkpoint(tmp_path, state, {}, {})
    assert json.loads((path / "state.json").read_text())["optimizer_layout"] == "torch"
    sharded = _state(seed=5)
    sharded.strategy = FullySharded(sharded.unet, sharded.optimizer)
    with pytest.raises(ConfigError, match="'torch'.*'fsdp-full'"):
        load_checkpoint(path, sharded)
    assert not torch.equal(sharded.unet[0].weight, state.unet[0].weight)  # nothing was half-restored


def test_a_checkpoint_of_another_format_is_reported_as_such_naming_both_versions(tmp_path: Path, caplog) -> None:
    state = _state(ema=False)
    _train_steps(state, 1)
    path = save_checkpoint(tmp_path, state, {}, {})
    document = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**document, "format_version": 1}))
    with pytest.raises(ConfigError, match=r"format_version 1, and this expertune resumes format_version 2") as info:
        resolve_checkpoint(tmp_path, path.name)
    assert "damaged" not in str(info.value)
    with caplog.at_level(logging.WARNING):
        assert list_checkpoints(tmp_path) == []
    assert "format_version 1" in caplog.text and "damaged" not in caplog.text


def test_a_stored_config_snapshot_is_migrated_before_resume_compares_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from expertune.config import migrations

    def rename(snapshot):  # version 1 -> 2: an option renamed
        train = dict(snapshot["train"])
        train["batch_size_per_process"] = train.pop("train_batch_size")
        return {**snapshot, "train": train}

    monkeypatch.setattr(migrations, "CONFIG_VERSION", 2)
    monkeypatch.setitem(migrations.MIGRATIONS, 1, rename)
    stored = {"config": {"train": {"train_batch_size": 8}}, "config_version": 1, "run_identity": {}}
    assert check_resume_compatible(stored, {"train": {"batch_size_per_process": 8}}, {}, False, tmp_path) == []
    with pytest.raises(ConfigError, match="batch_size_per_process: 8 -> 4"):
        check_resume_compatible(stored, {"train": {"batch_size_per_process": 4}}, {}, False, tmp_path)
    with pytest.raises(ConfigError, match="version 3.*upgrade expertune"):
        check_resume_compatible({**stored, "config_version": 3}, {"train": {}}, {}, False, tmp_path)


def test_options_added_since_a_checkpoint_was_written_do_not_block_its_resume() -> None:
    from expertune.config import Config
    from expertune.train.resume_check import config_changes

    current = Config().to_dict()
    older = {section: {k: v for k, v in values.items() if k not in ("snr_gamma", "allow_tf32")}
             for section, values in current.items()}
    assert config_changes(older, current) == []
    changed = Config.from_flat({"snr_gamma": 5.0}).to_dict()
    assert [c.name for c in config_changes(older, changed)] == ["snr_gamma"]


def _dropout_state(seed: int, device: str = "cpu") -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainingState(0, DataPosition(0, 0, 0), model, optimizer, scheduler, torch.Generator().manual_seed(seed),
                         [0], None)


def _dropout_steps(state: TrainingState, steps: int) -> list[float]:
    """Steps whose only randomness besides the run's generator is dropout's: the global RNG of the model's device."""
    device = next(state.unet.parameters()).device
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, generator=state.generator).to(device)
        loss = state.unet(x).pow(2).mean()
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.step += 1
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_resume_restores_the_global_rng_a_dropout_model_draws_from(tmp_path: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA generator's round trip needs one")
    reference = _dropout_state(0, device)
    expected = _dropout_steps(reference, 6)
    first = _dropout_state(0, device)
    assert _dropout_steps(first, 3) == expected[:3]
    path = save_checkpoint(tmp_path, first, {"train": {"seed": 0}}, {"items": 3})
    _dropout_steps(first, 2)  # the process draws on after the save: the resume must not see these draws
    resumed = _dropout_state(1, device)  # another seed: the global RNG differs until the checkpoint restores it
    load_checkpoint(path, resumed)
    assert _dropout_steps(resumed, 3) == expected[3:]
    for a, b in zip(reference.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
