"""The one preparation path of `train` and `cache`: buckets, several datasets, bad data, re-encoding."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import MESSY_SKIPPED, write_messy_datasets
from expertune.cache.store import CacheStore
from expertune.config import load_config
from expertune.errors import DataError
from expertune.prepare import PreparedData, cache_only
from expertune.validate.plan import prompt_texts


def _config(model: Path, loader: Path, *extra: str):
    config, _ = load_config([f"--pretrained_model_name_or_path={model}", f"--data_backend_config={loader}",
                             "--train_batch_size=2", *extra])
    return config


def _journal_counts(root: Path) -> dict[str, int]:
    """Keys written per store under `root` (the stores' write journals)."""
    counts: dict[str, int] = {}
    for journal in root.rglob("writes.log"):
        for key in CacheStore(journal.parent).journal():
            counts[key] = counts.get(key, 0) + 1
    return counts


def _prepare(config, caplog: pytest.LogCaptureFixture | None = None) -> PreparedData:
    if caplog is None:
        return cache_only(config, prompt_texts(config), progress=False)
    with caplog.at_level(logging.INFO, logger="expertune"):
        return cache_only(config, prompt_texts(config), progress=False)


def test_several_datasets_buckets_and_every_bad_file_named(tiny_model_dir: Path, messy_dataset: Path,
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepared = _prepare(_config(tiny_model_dir, messy_dataset), caplog)
    # Every bad file is left out with its reason, logged with its path, and nothing else is.
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in prepared.skipped}
    assert set(reasons) == set(MESSY_SKIPPED)
    for name, words in MESSY_SKIPPED.items():
        assert words in reasons[name], (name, reasons[name])
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    assert {entry["dataset"] for entry in prepared.skipped} == {"photos"}
    # Buckets: one dataset, one size each; names' two images listed twice (repeats 1).
    assert [(r["dataset"], r["width"], r["height"], r["images"], r["samples"]) for r in prepared.bucket_table] == [
        ("photos", 64, 64, 6, 6), ("photos", 96, 64, 2, 2), ("photos", 64, 96, 1, 1),
        ("names", 64, 64, 2, 4), ("subject", 64, 64, 1, 1),
    ]
    assert {b.dataset: b.weight for b in prepared.buckets} == {"photos": 1.0, "names": 2.0, "subject": 1.0}
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("aspect buckets"))
    assert "96x64" in table and "64x96" in table
    assert any("served as smaller batches" in r.getMessage() and "subject 64x64 (1)" in r.getMessage()
               for r in caplog.records)
    # Latent shapes follow the buckets, with the true original size and the crop in the time ids.
    for item in prepared.items:
        latent, time_ids = prepared.latent_cache.load(item.record, item.spec)
        h, w = int(time_ids[4]), int(time_ids[5])
        assert latent.shape == (4, h // 8, w // 8)
        with Image.open(item.record.path) as image:
            assert (int(time_ids[0]), int(time_ids[1])) == (image.height, image.width)
    by_name = {item.record.path.name: item for item in prepared.unique_items}
    assert prepared.latent_cache.load(by_name["wide2.png"].record, by_name["wide2.png"].spec)[1].tolist() == [
        60, 100, 0, 5, 64, 96]  # 100 x 60 scaled to 107 x 64, 11 columns cut, centred: 5 on the left
    # Unusual modes were decoded right: the 16-bit grey is mid-grey, not clipped to white.
    grey = prepared.latent_cache.load(by_name["grey16.png"].record, by_name["grey16.png"].spec)[0]
    white = prepared.latent_cache.encode_pixels(torch.ones(1, 3, 64, 64))[0]
    assert not torch.allclose(grey, white, atol=1e-3)
    # Captions: textfile lines, file names, the instance prompt; every one cached.
    assert by_name["multi.png"].captions == ("the first caption of multi", "the second caption of multi")
    assert by_name["blue-circle.png"].captions == ("blue circle",)
    assert by_name["one.png"].captions == ("a photo of sks",)
    assert len(prepared.items) == 9 + 2 * 2 + 1
    assert prepared.cache_stats == {"latents_encoded": 12, "latents_reused": 0, "embeds_encoded": 13, "embeds_reused": 0}
    # The per-user default cache (no cache dir named anywhere), and a second pass encodes nothing.
    cache_root = tmp_path / "xdg-cache" / "expertune"
    assert len(list((cache_root / "latents").rglob("*.safetensors"))) == 12
    again = _prepare(_config(tiny_model_dir, messy_dataset))
    assert again.cache_stats == {"latents_encoded": 0, "latents_reused": 12, "embeds_encoded": 0, "embeds_reused": 13}
    assert {Path(e["path"]).name for e in again.skipped} == set(MESSY_SKIPPED)


def test_no_usable_image_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "bad"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    (images / "b.png").write_text("not an image")
    loader = tmp_path / "loader.json"
    loader.write_text(f'[{{"id": "bad", "instance_data_dir": "{images}", "resolution": 64}}]')
    with pytest.raises(DataError, match=r"no usable image in the datasets of .*loader.json: all 2 images were skipped") as info:
        _prepare(_config(tiny_model_dir, loader))
    assert "a.png: " in str(info.value) and "empty" in str(info.value)


def test_changed_image_or_vae_reencodes_exactly_the_affected_entries(tiny_model_dir: Path, tmp_path: Path) -> None:
    loader = write_messy_datasets(tmp_path / "data")
    cache_root = tmp_path / "xdg-cache" / "expertune"
    first = _prepare(_config(tiny_model_dir, loader))
    before = _journal_counts(cache_root)
    assert len(before) == 12 + 13 and set(before.values()) == {1}

    # New pixels in one image, same size: one new latent, nothing else.
    wide = tmp_path / "data" / "photos" / "wide.png"
    Image.fromarray(np.zeros((64, 96, 3), dtype=np.uint8)).save(wide)
    second = _prepare(_config(tiny_model_dir, loader))
    assert second.cache_stats == {"latents_encoded": 1, "latents_reused": 11, "embeds_encoded": 0, "embeds_reused": 13}
    after = _journal_counts(cache_root)
    assert set(after) - set(before) == {second.latent_cache.key_for(*_item(second, "wide.png"))}
    assert all(after[key] == 1 for key in after)

    # Another VAE (one weight nudged): every latent again, no text embedding.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    third = _prepare(_config(model, loader))
    assert third.cache_stats == {"latents_encoded": 12, "latents_reused": 0, "embeds_encoded": 0, "embeds_reused": 13}
    assert len(_journal_counts(cache_root)) == len(after) + 12
    assert first.latent_cache.fingerprint != third.latent_cache.fingerprint


def _item(prepared: PreparedData, name: str):
    item = next(item for item in prepared.unique_items if item.record.path.name == name)
    return item.record, item.spec


def test_the_cycle_collector_pauses_only_where_asked_and_comes_back() -> None:
    import gc

    from expertune.prepare import _cycle_collector_paused

    assert gc.isenabled()
    with _cycle_collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with _cycle_collector_paused(False):  # a bucket's listing and fetches
        assert gc.isenabled()
    with pytest.raises(RuntimeError), _cycle_collector_paused():
        raise RuntimeError("a failure inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with _cycle_collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()


def test_data_preparation_hides_older_objects_from_the_collector_and_gives_them_back() -> None:
    import gc

    from expertune.prepare import _collector_sees_only_new_objects

    assert gc.get_freeze_count() == 0
    with _collector_sees_only_new_objects():
        assert gc.get_freeze_count() > 0  # the models and libraries loaded so far
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), _collector_sees_only_new_objects():
        raise RuntimeError("a failure inside")
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left as it was
    try:
        frozen = gc.get_freeze_count()
        with _collector_sees_only_new_objects():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
