"""Checkpoints that survive power loss, bit rot, full disks, abandoned branches and non-finite weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from expertune.errors import ConfigError, NonFiniteError, StorageError
from expertune.run_folder import manifest_problem
from expertune.train.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_document,
    record_lineage,
    resolve_checkpoint,
    save_checkpoint,
    save_job_checkpoint,
)
from test_checkpoint import _state, _train_steps


def _saved(root: Path, steps: int, ema: bool = False) -> list[Path]:
    state = _state(ema=ema)
    paths = []
    for _ in range(steps):
        _train_steps(state, 1)
        paths.append(save_checkpoint(root, state, {}, {}))
    return paths


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def _wide_state(seed: int = 0) -> TrainingState:
    """A model whose weights file (256 KiB) is bigger than what the full-disk test leaves free."""
    from expertune.train.checkpoint import DataPosition

    torch.manual_seed(seed)
    model = torch.nn.Linear(256, 256, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return TrainingState(0, DataPosition(0, 0, 0), model, optimizer, scheduler,
                         torch.Generator().manual_seed(seed), [0])


def _wide_steps(state: TrainingState, steps: int) -> None:
    for _ in range(steps):
        state.unet(torch.randn(4, 256, generator=state.generator)).pow(2).mean().backward()
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad()
        state.step += 1


def _fill(disk: Path, leave: int) -> Path:
    """Fill the file system of `disk` until `leave` bytes are free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.integration  # starts a process (the conftest rule)
def test_a_full_disk_is_a_clean_stop_and_the_run_resumes_bitwise(resizable_disk) -> None:
    """On a real full file system safetensors raises its own SafetensorError (not an OSError) for the weights
    file: still exit 3, one line naming the checkpoint, nothing partial, the previous checkpoint intact and
    resumable bit for bit once space is freed."""
    reference = _wide_state()
    _wide_steps(reference, 4)
    disk = resizable_disk(4096)
    state = _wide_state()
    _wide_steps(state, 2)
    save_checkpoint(disk, state, {}, {})
    filler = _fill(disk, 64 * 1024)  # less than the 256 KiB weights file, the first one a checkpoint writes
    _wide_steps(state, 1)
    with pytest.raises(StorageError) as info:
        save_checkpoint(disk, state, {}, {})
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    assert "checkpoint-3" in message and "disk is full" in message and "MiB free" in message, message
    assert [p.name for p in (disk / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert _hidden(disk) == []
    filler.unlink()
    resumed = _wide_state(seed=7)
    load_checkpoint(resolve_checkpoint(disk, "latest"), resumed)
    _wide_steps(resumed, 2)
    assert torch.equal(reference.unet.weight, resumed.unet.weight)


def test_every_file_is_fsynced_before_the_checkpoint_is_renamed_in(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    synced: set[int] = set()
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = _saved(tmp_path, 1, ema=True)[0]
    files = [p for p in path.rglob("*")]
    assert {p.name for p in files} >= {"unet.safetensors", "optimizer.safetensors", "ema.safetensors",
                                        "state.safetensors", "state.json", "manifest.json"}
    assert all(p.stat().st_ino in synced for p in files), [p.name for p in files if p.stat().st_ino not in synced]
    assert path.parent.stat().st_ino in synced  # the rename itself


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog) -> None:
    first, second, third = _saved(tmp_path, 3)
    manifest = json.loads((third / "manifest.json").read_text())
    assert manifest["files"]["unet.safetensors"]["sha256"]
    weights = third / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in a tensor value: same size, same header
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest") == second
    assert "checkpoint-3" in caplog.text and "unet.safetensors" in caplog.text and "falling back" in caplog.text
    with pytest.raises(ConfigError, match=r"checkpoint-3 is damaged.*unet\.safetensors.*digest") as info:
        resolve_checkpoint(tmp_path, "checkpoint-3")
    assert info.value.exit_code == 2
    truncated = second / "optimizer.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a torn write that power loss left
    assert resolve_checkpoint(tmp_path, "latest") == first
    assert manifest_problem(first) is None


def test_latest_follows_the_lineage_a_resume_from_an_older_checkpoint_starts(tmp_path: Path, caplog) -> None:
    """checkpoint-6 exists, the run resumes checkpoint-4: 6 is an abandoned branch from then on (never latest,
    pruned first), and checkpoint-4 survives until a newer checkpoint of the new lineage is durable."""
    _saved(tmp_path, 6)
    four = tmp_path / "checkpoints" / "checkpoint-4"
    state = _state(seed=3, ema=False)
    load_checkpoint(four, state)
    with caplog.at_level(logging.WARNING):
        record_lineage(tmp_path, four)
    assert "checkpoint-5, checkpoint-6" in caplog.text and "abandoned" in caplog.text
    assert resolve_checkpoint(tmp_path, "latest") == four  # killed before its first checkpoint: still 4
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]
    _train_steps(state, 1)
    state.optimizer.param_groups[0]["lr"] = 0.05  # the new branch differs from the abandoned one
    five = save_checkpoint(tmp_path, state, {}, {})
    assert read_checkpoint_document(five)["sequence"] > read_checkpoint_document(four)["sequence"]
    assert resolve_checkpoint(tmp_path, "latest") == five
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-5", "lineage.json"]


def test_a_resumed_branch_rewrites_an_abandoned_checkpoint_of_the_same_step(tmp_path: Path) -> None:
    _saved(tmp_path, 3)
    two = tmp_path / "checkpoints" / "checkpoint-2"
    state = _state(seed=4, ema=False)
    load_checkpoint(two, state)
    record_lineage(tmp_path, two)
    _train_steps(state, 1)
    three = save_checkpoint(tmp_path, state, {}, {})
    assert resolve_checkpoint(tmp_path, "latest") == three
    assert read_checkpoint_document(three)["sequence"] == 4
    assert json.loads((tmp_path / "checkpoints" / "lineage.json").read_text())["abandoned"] == []


def test_resuming_a_checkpoint_of_an_abandoned_branch_makes_it_the_lineage_again(tmp_path: Path) -> None:
    _saved(tmp_path, 3)
    root = tmp_path / "checkpoints"
    record_lineage(tmp_path, root / "checkpoint-1")  # 2 and 3 abandoned
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-1"
    record_lineage(tmp_path, root / "checkpoint-3")  # back to the first branch's end: 3 is the lineage again
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-3"
    assert json.loads((root / "lineage.json").read_text())["abandoned"] == ["checkpoint-2"]


def test_non_finite_weights_are_never_checkpointed_and_older_ones_are_kept(tmp_path: Path) -> None:
    _saved(tmp_path, 2)
    state = _state(ema=True)
    _train_steps(state, 3)
    with torch.no_grad():
        state.unet[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not finite at step 3 \(0\.weight holds NaN"):
        save_checkpoint(tmp_path, state, {}, {})
    with torch.no_grad():
        state.unet[0].weight[0, 0] = 0.0
        state.ema.shadow[1][0] = float("inf")
    with pytest.raises(NonFiniteError, match="EMA weight 1"):
        save_checkpoint(tmp_path, state, {}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert _hidden(tmp_path) == []


def test_grad_scaler_state_is_saved_and_restored(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    state = _state(ema=False)
    _train_steps(state, 1)
    scaler.scale(state.unet(torch.ones(1, 3)).sum() * float("inf")).backward()
    scaler.step(state.optimizer)  # an overflow: the step is skipped and the scale halved
    scaler.update()
    path = save_job_checkpoint(tmp_path, [state], {}, {}, grad_scaler=scaler.state_dict())
    saved = read_checkpoint_document(path)["grad_scaler"]
    assert saved["scale"] == 512.0 and saved["growth_interval"] == 3
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(saved)
    assert restored.get_scale() == 512.0 and restored.state_dict() == scaler.state_dict()


@pytest.mark.integration  # starts a process (the conftest rule)
def test_a_full_disk_while_writing_validation_images_is_one_line_and_leaves_no_temporary_file(resizable_disk) -> None:
    from expertune.io_utils import atomic_write_bytes
    from expertune.run_folder import disk_full_is_a_stop

    disk = resizable_disk(256)
    folder = disk / "validation" / "step_000003"
    _fill(disk, 0)
    with pytest.raises(StorageError) as info:
        with disk_full_is_a_stop("validation images in", folder):
            atomic_write_bytes(folder / "prompt.png", b"\x89PNG" + b"\0" * 65536)
    assert info.value.exit_code == 3
    assert str(info.value).startswith(f"{folder / 'prompt.png'}: the disk is full")  # the file, what to free
    assert [p.name for p in folder.iterdir()] == []


def test_a_checkpoint_written_before_manifests_still_resumes_but_a_new_one_without_its_manifest_does_not(
        tmp_path: Path, caplog) -> None:
    first, second = _saved(tmp_path, 2)
    document = json.loads((first / "state.json").read_text())
    del document["sequence"]  # as expertune wrote it before checkpoints had a write order and digests
    (first / "state.json").write_text(json.dumps(document))
    (first / "manifest.json").unlink()
    (second / "manifest.json").unlink()  # one of ours that lost its manifest: damaged
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest") == first
    assert "checkpoint-2" in caplog.text and "manifest.json is missing" in caplog.text
