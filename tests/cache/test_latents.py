from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertune.cache.latents import LatentCache
from expertune.cache.store import CacheStats, CacheStore
from expertune.data.dataloader import DatasetSpec
from expertune.data.records import ImageRecord, discover_records
from expertune.data.transforms import image_size, image_to_tensor, load_image, plan_crop
from expertune.errors import DataError


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae").eval()


def _noise_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _dataset(tmp_path: Path, crop_style: str = "center", resolution: int = 32, name: str = "set") -> DatasetSpec:
    images = tmp_path / name
    for index, size in enumerate([(48, 40), (32, 64), (50, 33)]):
        _noise_image(images / f"img_{index}.png", size, seed=index)
    return DatasetSpec(name, images, "filename", None, resolution, crop_style, tmp_path / "cache" / name, 0, False)


def _items(spec: DatasetSpec) -> list[tuple[ImageRecord, DatasetSpec]]:
    return [(record, spec) for record in discover_records(spec).records]


def test_second_ensure_and_second_instance_reuse_everything(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path, crop_style="random")
    items = _items(spec)
    cache = LatentCache(vae, seed=3, batch_size=2)
    assert cache.ensure(items) == CacheStats(encoded=3, reused=0)
    assert cache.ensure(items) == CacheStats(encoded=0, reused=3)
    fresh = LatentCache(vae, seed=3, batch_size=2)  # what a new process computes from scratch
    assert [fresh.key_for(r, s) for r, s in items] == [cache.key_for(r, s) for r, s in items]
    assert fresh.ensure(items) == CacheStats(encoded=0, reused=3)
    files = sorted(p.name for p in spec.cache_dir_vae.rglob("*") if p.is_file())
    assert len(files) == 5 and sum(name.endswith(".safetensors") for name in files) == 3
    assert {"writes.log", "verified.jsonl"} <= set(files)  # the journal, the verified shards; no lock file left
    assert len(cache.store_for(spec).journal()) == 3


def test_a_restart_after_a_cold_run_opens_no_cache_entry(
        tmp_path: Path, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _dataset(tmp_path, crop_style="center")
    items = _items(spec)
    assert LatentCache(vae, seed=3, batch_size=2).ensure(items) == CacheStats(encoded=3, reused=0)
    opened: list[str] = []
    contains = CacheStore.contains
    monkeypatch.setattr(CacheStore, "contains", lambda store, key: opened.append(key) or contains(store, key))
    # The cold run remembered the shards it wrote as verified: a new process reuses every entry unopened.
    assert LatentCache(vae, seed=3, batch_size=2).ensure(items) == CacheStats(encoded=0, reused=3)
    assert opened == []


def test_each_file_is_hashed_once_per_instance(tmp_path: Path, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    import expertune.cache.latents as latents_module

    hashed: list[Path] = []
    real_digest = latents_module.file_digest

    def counting_digest(path):
        hashed.append(Path(path))
        return real_digest(path)

    monkeypatch.setattr(latents_module, "file_digest", counting_digest)
    spec = _dataset(tmp_path)
    items = _items(spec)
    cache = LatentCache(vae, seed=0, batch_size=4)
    cache.ensure(items)
    cache.ensure(items)
    for record, _ in items:
        cache.load(record, spec)
    assert sorted(hashed) == sorted(record.path for record, _ in items)


def test_changed_image_bytes_reencode_exactly_that_image(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path)
    items = _items(spec)
    cache = LatentCache(vae, seed=0, batch_size=4)
    cache.ensure(items)
    _noise_image(items[1][0].path, (32, 64), seed=99)  # same size, new pixels
    items = _items(spec)  # a restart: the walk stamps the edited file anew
    assert cache.ensure(items) == CacheStats(encoded=1, reused=2)
    assert LatentCache(vae, seed=0, batch_size=4).ensure(items) == CacheStats(encoded=0, reused=3)


def test_different_vae_weights_reencode_everything(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path)
    items = _items(spec)
    LatentCache(vae, seed=0, batch_size=4).ensure(items)
    other = copy.deepcopy(vae)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert LatentCache(other, seed=0, batch_size=4).ensure(items) == CacheStats(encoded=3, reused=0)


def test_loaded_latent_equals_direct_encoding(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path, crop_style="corner")
    items = _items(spec)
    cache = LatentCache(vae, seed=0, batch_size=3)
    cache.ensure(items)
    for record, _ in items:
        plan = plan_crop(image_size(record.path), 32, "corner", 0, "unused for corner crops")
        pixels = image_to_tensor(load_image(record.path), plan)[None]
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
        latent, time_ids = cache.load(record, spec)
        assert latent.dtype == torch.float32 and latent.shape == (4, 4, 4)
        torch.testing.assert_close(latent, expected)
        assert time_ids.dtype == torch.float32
        assert time_ids.tolist() == list(plan.time_ids())


def test_mixed_resolutions_batch_by_size_and_stores_follow_datasets(tmp_path: Path, vae) -> None:
    small = _dataset(tmp_path, resolution=32, name="small")
    large = _dataset(tmp_path, resolution=64, name="large")
    cache = LatentCache(vae, seed=0, batch_size=8)
    assert cache.ensure(_items(small) + _items(large)) == CacheStats(encoded=6, reused=0)
    assert cache.load(*_items(large)[0])[0].shape == (4, 8, 8)
    assert cache.load(*_items(small)[0])[0].shape == (4, 4, 4)
    assert len(list(small.cache_dir_vae.rglob("*.safetensors"))) == 3
    assert len(list(large.cache_dir_vae.rglob("*.safetensors"))) == 3
    # Listing the same images twice is one entry each.
    assert cache.ensure(_items(small) * 2) == CacheStats(encoded=0, reused=3)


def test_damaged_entry_is_reencoded_and_missing_entry_is_an_error(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path)
    items = _items(spec)
    cache = LatentCache(vae, seed=0, batch_size=2)
    with pytest.raises(DataError, match="LatentCache.ensure"):
        cache.load(*items[0])
    cache.ensure(items)
    path = cache.store_for(spec).path_for(cache.key_for(*items[2]))
    path.write_bytes(path.read_bytes()[:50])
    assert cache.ensure(items) == CacheStats(encoded=1, reused=2)
    cache.load(*items[2])


def test_random_crops_follow_the_seed(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path, crop_style="random")
    record = _items(spec)[2][0]  # 50 x 33: 48 x 32 after resizing, 17 possible left offsets
    keys = {LatentCache(vae, seed=seed, batch_size=1).key_for(record, spec) for seed in range(6)}
    assert len(keys) > 1
    assert LatentCache(vae, seed=1, batch_size=1).key_for(record, spec) == LatentCache(vae, seed=1, batch_size=1).key_for(record, spec)


def _flip_keeping_size_and_mtime(path: Path, offset: int, new: bytes) -> None:
    import os

    stat = path.stat()
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["bit flip", "NaN"])
def test_a_damaged_real_latent_is_rebuilt_never_reused_with_one_warning(
        tmp_path: Path, vae, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    import logging
    import struct

    spec = _dataset(tmp_path)
    items = _items(spec)
    assert LatentCache(vae, seed=0, batch_size=4).ensure(items) == CacheStats(encoded=3, reused=0)
    cache = LatentCache(vae, seed=0, batch_size=4)
    record = items[0][0]
    path = cache.store_for(spec).path_for(cache.key_for(record, spec))
    good = cache.load(record, spec)[0].clone()
    if damage == "bit flip":
        _flip_keeping_size_and_mtime(path, path.stat().st_size - 2, bytes([path.read_bytes()[-2] ^ 0x40]))
    else:  # a NaN written over the latent's first float (the header says where the latent starts)
        (size,) = struct.unpack("<Q", path.read_bytes()[:8])
        start = 8 + size + json.loads(path.read_bytes()[8:8 + size])["latent"]["data_offsets"][0]
        _flip_keeping_size_and_mtime(path, start, struct.pack("<f", float("nan")))
    restarted = LatentCache(vae, seed=0, batch_size=4)  # the next `expertune cache` or training start
    with caplog.at_level(logging.WARNING):
        assert restarted.ensure(_items(spec)) == CacheStats(encoded=1, reused=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"cache entry {path} is damaged (its bytes do not match its digest); removed, it will be "
                        "rebuilt"]
    assert torch.allclose(restarted.load(record, spec)[0], good, atol=1e-5)  # re-encoded alone: batch numerics
    assert LatentCache(vae, seed=0, batch_size=4).ensure(_items(spec)) == CacheStats(encoded=0, reused=3)


def test_a_latent_damaged_during_training_is_refused_not_served(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path)
    items = _items(spec)
    cache = LatentCache(vae, seed=0, batch_size=4)
    cache.ensure(items)
    record = items[1][0]
    path = cache.store_for(spec).path_for(cache.key_for(record, spec))
    fresh = LatentCache(vae, seed=0, batch_size=4)
    _flip_keeping_size_and_mtime(path, path.stat().st_size - 2, bytes([path.read_bytes()[-2] ^ 0x01]))
    with pytest.raises(DataError, match="no usable cached latent"):
        fresh.load(record, spec)
    assert not path.exists()  # removed: the next start rebuilds it
