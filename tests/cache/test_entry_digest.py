"""Cache entries prove their bytes (issue 20): a digest checked at the first read, finite values only, and a
damaged entry removed (one warning naming it) so the next `expertune cache` or training start rebuilds it."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

import expertune.cache.store as store_module
from expertune.cache.store import (
    DIGEST_FIELD,
    CacheStore,
    NonFiniteEntry,
    Pending,
    cache_key,
    encode_entry,
    entry_digest,
    fill_entries,
)


def _entry(store: CacheStore, n: int = 0) -> tuple[str, Path]:
    key = cache_key("test", {"n": n})
    store.put(key, {"latent": torch.arange(12, dtype=torch.float32).reshape(2, 6) + n}, {"source": f"/x/{n}.png"})
    return key, store.path_for(key)


def _edit_keeping_size_and_mtime(path: Path, offset: int, new: bytes) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    with open(path, "r+b") as stream:  # in place: same inode, same size
        stream.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def _damage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "is damaged" in r.getMessage()]


def test_a_flipped_bit_is_found_even_by_a_verified_shard_and_the_entry_removed_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CacheStore(tmp_path / "store")
    keys = [_entry(store, n)[0] for n in range(3)]
    assert CacheStore(store.root).missing(keys) == set()  # another process verifies the shards and remembers them
    path = store.path_for(keys[1])
    _edit_keeping_size_and_mtime(path, path.stat().st_size - 3, b"\x7f")  # a bit in the last float
    fresh = CacheStore(store.root)
    with caplog.at_level(logging.INFO):
        assert fresh.missing(keys) == {keys[1]}
        assert fresh.get(keys[1]) is None and not fresh.contains(keys[1])
    assert _damage_warnings(caplog) == [
        f"cache entry {path} is damaged (its bytes do not match its digest); removed, it will be rebuilt"]
    assert not path.exists()
    assert fresh.get(keys[0]) is not None and fresh.get(keys[2]) is not None


def test_a_header_rewritten_to_other_valid_json_is_damaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CacheStore(tmp_path / "store")
    key, path = _entry(store)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + size]
    assert b"[2,6]" in header
    _edit_keeping_size_and_mtime(path, 8 + header.index(b"[2,6]"), b"[3,4]")  # still JSON, same bytes described
    json.loads(path.read_bytes()[8:8 + size])
    assert CacheStore(store.root).missing([key]) == {key}
    assert len(_damage_warnings(caplog)) == 1 and not path.exists()


def test_non_finite_values_are_refused_when_written_and_when_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CacheStore(tmp_path / "store")
    key = cache_key("test", {"nan": 1})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteEntry, match="latent hold NaN or infinity"):
            store.put(key, {"latent": torch.tensor([1.0, bad]), "ids": torch.tensor([1])}, {})
    assert not store.path_for(key).exists() and store.journal() == []
    # An entry whose digest is right but whose values are not finite (written by hand, not by `put`).
    tensors = {"latent": torch.tensor([1.0, float("nan")])}
    first = save_safetensors(tensors, metadata={})
    (size,) = struct.unpack("<Q", first[:8])
    digest = entry_digest(json.loads(first[8:8 + size]), first[8 + size:])
    store.path_for(key).parent.mkdir(parents=True)
    store.path_for(key).write_bytes(save_safetensors(tensors, metadata={DIGEST_FIELD: digest}))
    assert store.get(key) is None and not store.path_for(key).exists()
    assert _damage_warnings(caplog) == [f"cache entry {store.path_for(key)} is damaged (tensor(s) latent hold NaN or "
                                        "infinity); removed, it will be rebuilt"]


def test_fill_lists_an_item_whose_tensors_are_not_finite_and_writes_nothing(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "store")
    pending = [Pending(cache_key("t", {"i": i}), (store,), i) for i in range(3)]
    result = fill_entries(pending, batch_size=3, encode=lambda items: [
        ({"x": torch.tensor([float("nan") if i == 1 else 1.0])}, {}) for i in items])
    assert result.written == 2 and [(item, reason.split(":")[0]) for item, reason in result.failed] == [(1, "not cached")]
    assert not store.path_for(pending[1].key).exists()  # (its empty lock file may stay: a lock holds no data)


def test_an_entry_without_a_digest_is_rebuilt_with_an_info_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CacheStore(tmp_path / "store")
    key = cache_key("test", {"old": 1})
    store.path_for(key).parent.mkdir(parents=True)
    store.path_for(key).write_bytes(save_safetensors({"latent": torch.ones(3)}, metadata={"source": "x"}))
    with caplog.at_level(logging.INFO):
        assert store.missing([key]) == {key}
    assert _damage_warnings(caplog) == [] and "written without a digest" in caplog.text
    assert not store.path_for(key).exists()


def test_an_entry_is_proven_once_per_process_while_it_is_the_same_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CacheStore(tmp_path / "store")
    key, path = _entry(store)
    proofs: list[int] = []
    real = store_module.verify_entry
    monkeypatch.setattr(store_module, "verify_entry", lambda data: proofs.append(1) or real(data))
    reader = CacheStore(store.root)
    for _ in range(3):
        tensors, metadata = reader.get(key)
        assert metadata == {"source": "/x/0.png"} and tensors["latent"].shape == (2, 6)
    assert len(proofs) == 1
    assert store.get(key) is not None and len(proofs) == 1  # its writer proved it when it wrote it
    path.write_bytes(encode_entry({"latent": torch.zeros(2, 6)}, {"source": "/x/0.png"}))  # a new version
    assert reader.get(key)[0]["latent"].sum() == 0 and len(proofs) == 2


def test_a_full_disk_while_caching_is_a_storage_error_with_nothing_partial(small_disk) -> None:
    from expertune.errors import StorageError

    store = CacheStore(small_disk.path / "store")
    pending = [Pending(cache_key("t", {"i": i}), (store,), i) for i in range(10)]
    with pytest.raises(StorageError, match=r"\.safetensors: the disk is full") as raised:
        fill_entries(pending, batch_size=2, encode=lambda items: [
            ({"x": torch.full((100_000,), float(i))}, {}) for i in items])  # 400 kB an entry, on a 2 MiB disk
    assert raised.value.exit_code == 3
    entries = list(store.root.rglob("*.safetensors"))
    assert 0 < len(entries) < 10 and all(CacheStore(store.root).contains(p.stem) for p in entries)
    assert not list(store.root.rglob("*.tmp"))
    for entry in pending:  # no lock is left held by this process (a resume would wait on it for ever)
        held = store.lock(entry.key, blocking=False)
        assert held is not None, entry.key
        held.release(done=False)


def test_entries_honour_the_umask_so_a_team_can_share_a_store(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        store = CacheStore(tmp_path / "store")
        key, path = _entry(store)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664 and store.journal_path.stat().st_mode & 0o777 == 0o664
