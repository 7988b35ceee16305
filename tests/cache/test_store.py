from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from expertune.cache.store import (
    JOURNAL_NAME,
    VERIFIED_NAME,
    CacheStore,
    cache_key,
    cache_key_template,
    file_digest,
    module_fingerprint,
)


def _files(root: Path) -> list[str]:
    """The store's files, less its write journal."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != JOURNAL_NAME)


def test_cache_key_is_canonical() -> None:
    key = cache_key("latent", {"a": 1, "b": [1, 2], "c": {"x": "é"}})
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key("latent", {"c": {"x": "é"}, "b": (1, 2), "a": 1}) == key  # order and tuples don't matter
    assert cache_key("embeds", {"a": 1, "b": [1, 2], "c": {"x": "é"}}) != key
    assert cache_key("latent", {"a": 2, "b": [1, 2], "c": {"x": "é"}}) != key
    with pytest.raises(TypeError, match="JSON values"):
        cache_key("latent", {"path": Path("x")})


def test_a_key_template_gives_cache_key_s_keys() -> None:
    parts = {"encoders": ["a", "b"], "max_length": [77, 77], "alpha": None, "zeta": {"x": 1.5}}
    key_of = cache_key_template("text_embeds", parts, "caption")
    for caption in ["a cat", "", 'quote " and \\ backslash', "ünïcødé ☃", "\ue000", "line\nbreak", "x" * 300]:
        assert key_of(caption) == cache_key("text_embeds", {**parts, "caption": caption})
    assert cache_key_template("latent", {}, "n")(3) == cache_key("latent", {"n": 3})
    with pytest.raises(ValueError, match="must not hold"):
        cache_key_template("text_embeds", {"a": "\ue000expertune-varying-part\ue000"}, "caption")


def _entries(store: CacheStore, count: int) -> list[str]:
    keys = [cache_key("test", {"n": n}) for n in range(count)]
    for n, key in enumerate(keys):
        store.put(key, {"x": torch.full((4,), float(n))}, {})
    return keys


class _Opens:
    """Counts the entries `contains` checks (by reading their headers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        contains = CacheStore.contains

        def counted(store: CacheStore, key: str) -> bool:
            self.keys.append(key)
            return contains(store, key)

        monkeypatch.setattr(CacheStore, "contains", counted)


def test_missing_answers_as_contains_and_an_unchanged_shard_from_its_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CacheStore(tmp_path / "store")
    keys = _entries(store, 12)
    absent = cache_key("test", {"n": "never written"})
    damaged = keys[3]
    with open(store.path_for(damaged), "r+b") as stream:  # cut short: its header describes more bytes
        stream.truncate(40)
    opens = _Opens(monkeypatch)
    assert store.missing([*keys, absent]) == {absent, damaged} == {k for k in [*keys, absent] if not store.contains(k)}
    assert (store.root / VERIFIED_NAME).exists()
    opens.keys.clear()
    # A restart: every shard's listing is the one verified, so no entry is opened, and the damaged one stays absent.
    assert CacheStore(store.root).missing([*keys, absent]) == {absent, damaged}
    assert opens.keys == []
    # Changes are seen: an entry rewritten, one truncated after its check, one removed, one written by another job.
    store.put(damaged, {"x": torch.zeros(4)}, {})
    other = keys[5]
    with open(store.path_for(other), "r+b") as stream:
        stream.truncate(os.path.getsize(store.path_for(other)) - 1)
    store.path_for(keys[7]).unlink()
    late = cache_key("test", {"n": "late"})
    CacheStore(store.root).put(late, {"x": torch.ones(4)}, {})
    opens.keys.clear()
    assert CacheStore(store.root).missing([*keys, late]) == {other, keys[7]}
    changed_shards = {key[:2] for key in (damaged, other, keys[7], late)}
    on_disk = [key for key in [*keys, late] if key != keys[7]]
    assert sorted(opens.keys) == sorted(key for key in on_disk if key[:2] in changed_shards)  # those shards only
    # An edit in place that keeps the size changes the mtime, and so the listing.
    opens.keys.clear()
    path = store.path_for(keys[0])
    data = bytearray(path.read_bytes())
    data[8:16] = b"{ broken"
    stat = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert keys[0] in CacheStore(store.root).missing(keys)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.missing(["not-a-key"])
    assert store.missing([]) == set()


def test_roundtrip_with_metadata(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "store")
    key = cache_key("test", {"n": 1})
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"view": base.t(), "half": torch.ones(2, dtype=torch.float16), "ids": torch.tensor([1, 2, 3])}
    assert not store.contains(key) and store.get(key) is None
    store.put(key, tensors, {"caption": "a cat", "source": "/x/y.png"})
    assert _files(store.root) == [f"{key[:2]}/{key}.safetensors"]
    assert store.journal() == [key]  # every write is journalled: key, pid, host, time
    assert f" {os.getpid()} " in store.journal_path.read_text()
    assert store.contains(key)
    entry = store.get(key)
    assert entry is not None
    loaded, metadata = entry
    assert metadata == {"caption": "a cat", "source": "/x/y.png"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    # Entries without metadata read back with an empty dict.
    other = cache_key("test", {"n": 2})
    store.put(other, {"x": torch.zeros(1)}, {})
    assert store.get(other)[1] == {}  # type: ignore[index]


def test_put_rejects_bad_keys_and_metadata(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.put("../escape", {"x": torch.zeros(1)}, {})
    with pytest.raises(TypeError, match="str to str"):
        store.put(cache_key("t", {}), {"x": torch.zeros(1)}, {"n": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header-only"])
def test_damaged_entry_reads_as_absent_and_put_repairs_it(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CacheStore(tmp_path)
    key = cache_key("test", {"damage": damage})
    store.put(key, {"x": torch.arange(100, dtype=torch.float32)}, {"k": "v"})
    path = store.path_for(key)
    good = path.read_bytes()
    damaged = {
        "truncated": good[: len(good) - 37],
        "garbage": os.urandom(len(good)),
        "empty": b"",
        "header-only": good[:8],
    }[damage]
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="expertune.cache"):
        assert store.get(key) is None
        assert not store.contains(key)
    assert any(str(path) in record.getMessage() for record in caplog.records)
    store.put(key, {"x": torch.arange(100, dtype=torch.float32)}, {"k": "v"})
    assert store.contains(key)
    assert torch.equal(store.get(key)[0]["x"], torch.arange(100, dtype=torch.float32))  # type: ignore[index]
    assert _files(tmp_path) == [f"{key[:2]}/{key}.safetensors"]


def test_put_is_atomic_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CacheStore(tmp_path)
    key = cache_key("test", {"atomic": True})
    store.put(key, {"x": torch.zeros(1000)}, {"version": "1"})
    before = store.path_for(key).read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(key, {"x": torch.ones(1000)}, {"version": "2"})
    monkeypatch.undo()
    assert store.path_for(key).read_bytes() == before  # never a partial or a new file at the final path
    assert _files(tmp_path) == [f"{key[:2]}/{key}.safetensors"]  # the temporary was removed
    assert store.get(key)[1] == {"version": "1"}  # type: ignore[index]


def test_module_fingerprint_tracks_content_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(layer.state_dict())
    assert module_fingerprint(layer) == module_fingerprint(twin)
    with torch.no_grad():
        twin.bias[0] += 1e-3
    assert module_fingerprint(layer) != module_fingerprint(twin)
    assert module_fingerprint(layer) != module_fingerprint(layer.to(torch.float64))
    assert module_fingerprint(torch.nn.Linear(4, 3, bias=False)) != module_fingerprint(layer)

    # The same weights loaded from two directories: the path in the config must not matter.
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    for loader, folder in ((AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        first = loader.from_pretrained(str(tiny_model_dir), subfolder=folder)
        second = loader.from_pretrained(str(copy), subfolder=folder)
        assert module_fingerprint(first) == module_fingerprint(second)


def test_file_digest_streams_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(10_000)
    path.write_bytes(data)
    assert file_digest(path, chunk_size=333) == hashlib.sha256(data).hexdigest() == file_digest(path)


def test_entry_lock_is_exclusive_and_its_file_goes_once_the_entry_exists(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    key = cache_key("test", {"lock": 1})
    held = store.lock(key)
    assert held is not None and held.path == store.path_for(key).with_suffix(".lock")
    assert store.lock(key, blocking=False) is None  # another holder (even in this process) must wait
    held.release(done=False)  # nothing written: the lock file stays for the next writer
    again = store.lock(key, blocking=False)
    assert again is not None and again.path.exists()
    store.put(key, {"x": torch.zeros(1)}, {})
    again.release(done=True)
    assert not again.path.exists() and _files(tmp_path) == [f"{key[:2]}/{key}.safetensors"]


def _fill_around_a_holder(tmp_path: Path, holder_writes: bool) -> tuple[object, list[list[str]], CacheStore, list[str]]:
    """fill_entries over three keys while a thread holds the first one's lock for 0.4 s."""
    import threading
    import time

    from expertune.cache.store import Pending, fill_entries

    store = CacheStore(tmp_path)
    keys = [cache_key("test", {"fill": n}) for n in range(3)]
    held = store.lock(keys[0])
    assert held is not None

    def holder() -> None:
        time.sleep(0.4)
        if holder_writes:
            store.put(keys[0], {"x": torch.full((2,), -1.0)}, {"by": "holder"})
        held.release(done=holder_writes)

    batches: list[list[str]] = []

    def encode(items: list[str]):
        batches.append(list(items))
        return [({"x": torch.full((2,), float(len(item)))}, {"by": "fill"}) for item in items]

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        result = fill_entries([Pending(key, (store,), f"item-{n}") for n, key in enumerate(keys)],
                              batch_size=8, encode=encode)
    finally:
        thread.join()
    return result, batches, store, keys


def test_fill_leaves_a_locked_entry_to_its_holder_and_reads_it_after(tmp_path: Path) -> None:
    result, batches, store, keys = _fill_around_a_holder(tmp_path, holder_writes=True)
    assert batches == [["item-1", "item-2"]]  # the held entry is never encoded here
    assert (result.written, result.found, result.failed) == (2, 1, [])
    assert sorted(store.journal()) == sorted(keys)  # each entry written exactly once
    assert store.get(keys[0])[1] == {"by": "holder"}  # type: ignore[index]
    assert not list(tmp_path.rglob("*.lock"))


def test_fill_writes_an_entry_whose_holder_gave_up(tmp_path: Path) -> None:
    result, batches, store, keys = _fill_around_a_holder(tmp_path, holder_writes=False)
    assert batches == [["item-1", "item-2"], ["item-0"]]  # waited for the holder, then made it itself
    assert (result.written, result.found) == (3, 0)
    assert sorted(store.journal()) == sorted(keys)


def test_fill_records_items_that_cannot_be_encoded(tmp_path: Path) -> None:
    from expertune.cache.store import Pending, fill_entries

    store = CacheStore(tmp_path)
    keys = [cache_key("test", {"bad": n}) for n in range(3)]

    def encode(items: list[int]):
        return ["cannot decode" if item == 1 else ({"x": torch.zeros(1)}, {}) for item in items]

    result = fill_entries([Pending(k, (store,), n) for n, k in enumerate(keys)], batch_size=2, encode=encode)
    assert (result.written, result.failed) == (2, [(1, "cannot decode")])
    assert store.contains(keys[0]) and not store.contains(keys[1]) and store.contains(keys[2])
