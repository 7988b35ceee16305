"""The crash-safety primitive: a write that fails leaves the old file or directory exactly as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from expertune.errors import StorageError
from expertune.io_utils import (
    append_bytes,
    atomic_write_bytes,
    atomic_write_json,
    replace_dir,
    staged_directory,
    storage_error,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent, {"file.bin"}) == []
    atomic_write_json(tmp_path / "value.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "value.json").read_text()) == {"a": [1, 2], "b": 1}


def test_a_failed_write_leaves_the_old_file_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old contents")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StorageError, match=r"file.bin: the disk is full .* Free space there"):
        atomic_write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path, {"file.bin"}) == []


def test_an_unserialisable_json_value_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "value.json"
    target.write_text('{"kept": true}\n')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"kept": True}
    assert _leftovers(tmp_path, {"value.json"}) == []


def test_a_failure_inside_a_staged_directory_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old weights")
    with pytest.raises(RuntimeError, match="export failed"):
        with staged_directory(target) as staged:
            (staged / "weights.bin").write_bytes(b"half of the new weights")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"old weights"
    assert _leftovers(tmp_path, {"pipeline"}) == []


def test_a_staged_directory_replaces_the_target_in_one_move(tmp_path: Path) -> None:
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"from the previous export")
    with staged_directory(target) as staged:
        assert staged.name == "pipeline" and staged.parent != tmp_path
        (staged / "new.bin").write_bytes(b"new")
        assert (target / "stale.bin").exists()  # the old one stays readable until the rename
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert _leftovers(tmp_path, {"pipeline"}) == []


def test_replace_dir_without_an_earlier_target(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a").write_text("a")
    replace_dir(staged, tmp_path / "target")
    assert (tmp_path / "target" / "a").read_text() == "a" and not staged.exists()


def test_a_full_real_disk_is_a_storage_error_and_leaves_nothing_partial(small_disk) -> None:
    target = small_disk.path / "entry.bin"
    target.write_bytes(b"old")
    small_disk.fill(leave=64 * 1024)
    with pytest.raises(StorageError, match=r"entry.bin: the disk is full") as raised:
        atomic_write_bytes(target, b"x" * (512 * 1024))
    assert raised.value.exit_code == 3
    assert target.read_bytes() == b"old"
    assert _leftovers(small_disk.path, {"entry.bin", ".filler"}) == []


def test_an_append_on_a_full_disk_is_cut_back_for_a_sole_writer(small_disk) -> None:
    log = small_disk.path / "metrics.jsonl"
    append_bytes(log, b'{"step": 1}\n', sole_writer=True)
    small_disk.fill(leave=0)
    with pytest.raises(StorageError, match="metrics.jsonl: the disk is full"):
        append_bytes(log, b'{"step": 2, "pad": "' + b"y" * 300_000 + b'"}\n', sole_writer=True)
    assert log.read_bytes() == b'{"step": 1}\n'


def test_safetensors_own_full_disk_error_is_recognised(small_disk) -> None:
    import torch
    from safetensors.torch import save_file

    small_disk.fill(leave=16 * 1024)
    target = small_disk.path / "weights.safetensors"
    with pytest.raises(Exception) as raised:
        save_file({"w": torch.zeros(256, 1024)}, str(target))
    error = storage_error(target, raised.value)
    assert error is not None and error.exit_code == 3, f"{type(raised.value).__name__}: {raised.value}"
    assert storage_error(target, ValueError("other")) is None


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"data")
        append_bytes(tmp_path / "b.log", b"line\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.log").stat().st_mode & 0o777 == mode
