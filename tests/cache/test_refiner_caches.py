"""Caches of the SDXL refiner layout: its own text embeddings (text encoder 2 only, keyed apart from the base
layout's), the base's latents when the VAE is the same, and the aesthetic-score time ids read from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertune.cache.embeds import EMBED_KIND, REFINER_EMBED_KIND, EmbedCache, encode_prompts
from expertune.cache.latents import LatentCache, check_shared_vae, same_vae
from expertune.cache.store import CacheStats, CacheStore
from expertune.data.batches import TimeIdLayout, refiner_time_ids
from expertune.data.dataloader import DatasetSpec
from expertune.data.records import discover_records
from expertune.errors import ConfigError
from expertune.models.sdxl import load_components

PROMPTS = ["a red cube on a table", "", "a very long prompt " * 12]


@pytest.fixture(scope="module")
def refiner_pipe(tiny_refiner_dir: Path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_dir), use_safetensors=True)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_refiner_dir: Path):
    return load_components(str(tiny_model_dir), with_unet=False), load_components(str(tiny_refiner_dir),
                                                                                with_unet=False)


def test_refiner_embeddings_equal_diffusers_refiner_encode_prompt(refiner_pipe) -> None:
    for prompt in PROMPTS:
        expected, _, expected_pooled, _ = refiner_pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeds, pooled = encode_prompts([refiner_pipe.tokenizer_2], [refiner_pipe.text_encoder_2], [prompt])
        assert embeds.shape == (1, 77, refiner_pipe.text_encoder_2.config.hidden_size)  # bigG only
        assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)
    with pytest.raises(ValueError, match="refiner layout one of each"):
        encode_prompts([refiner_pipe.tokenizer_2], [], ["x"])


def test_refiner_and_base_entries_of_one_caption_never_collide(models, tmp_path: Path) -> None:
    base, refiner = models
    # The tiny refiner shares the base's text encoder 2 and tokenizer 2: only the layout tells the entries apart.
    store = CacheStore(tmp_path / "text_embeds")
    base_cache = EmbedCache(base.tokenizers, base.text_encoders, store=store, batch_size=2)
    refiner_cache = EmbedCache(refiner.tokenizers, refiner.text_encoders, store=store, batch_size=2)
    assert (base_cache.kind, refiner_cache.kind) == (EMBED_KIND, REFINER_EMBED_KIND)
    assert all(base_cache.key_for(p) != refiner_cache.key_for(p) for p in PROMPTS)
    assert base_cache.ensure(PROMPTS) == CacheStats(encoded=3, reused=0)
    assert refiner_cache.ensure(PROMPTS) == CacheStats(encoded=3, reused=0)  # nothing of the base's is reused
    assert refiner_cache.ensure(PROMPTS) == CacheStats(encoded=0, reused=3)
    assert len(store.journal()) == 6
    base_embeds, base_pooled = base_cache.load(PROMPTS[0])
    refiner_embeds, refiner_pooled = refiner_cache.load(PROMPTS[0])
    assert base_embeds.shape == (77, 16 + 32) and refiner_embeds.shape == (77, 32)
    # Text encoder 2's part of the base embedding is the refiner's embedding; the pooled output is the same.
    torch.testing.assert_close(base_embeds[:, 16:], refiner_embeds)
    torch.testing.assert_close(base_pooled, refiner_pooled)
    assert store.get(refiner_cache.key_for(PROMPTS[0]))[1]["kind"] == REFINER_EMBED_KIND


def _dataset(tmp_path: Path) -> DatasetSpec:
    images = tmp_path / "images"
    images.mkdir()
    for index, size in enumerate([(48, 40), (64, 64)]):
        pixels = np.random.default_rng(index).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"img_{index}.png")
    return DatasetSpec("set", images, "filename", None, 32, "random", tmp_path / "cache" / "vae", 0, False)


def test_latents_are_shared_when_the_vae_is_the_same_and_read_with_aesthetic_time_ids(
        models, tiny_model_dir: Path, tmp_path: Path) -> None:
    from expertune.models.tiny import build_tiny_refiner

    base, refiner = models
    spec = _dataset(tmp_path)
    items = [(record, spec) for record in discover_records(spec).records]
    base_cache = LatentCache(base.vae, seed=0, batch_size=2)
    refiner_cache = LatentCache(refiner.vae, seed=0, batch_size=2, time_ids=TimeIdLayout(7.0))
    assert same_vae(base, refiner)
    check_shared_vae([base, refiner], ["expert 0", "expert 1"])
    assert [base_cache.key_for(*i) for i in items] == [refiner_cache.key_for(*i) for i in items]
    assert base_cache.ensure(items) == CacheStats(encoded=2, reused=0)
    assert refiner_cache.ensure(items) == CacheStats(encoded=0, reused=2)  # the base's latents, reused
    for item in items:
        latent, six = base_cache.load(*item)
        same_latent, five = refiner_cache.load(*item)
        assert torch.equal(latent, same_latent)
        assert six.shape == (6,) and five.tolist() == [*six[:4].tolist(), 7.0]
    view = base_cache.with_time_ids(TimeIdLayout(7.0))  # one cache, read for another layout
    assert torch.equal(view.load(*items[0])[1], refiner_cache.load(*items[0])[1])
    assert base_cache.load(*items[0])[1].shape == (6,)  # the original is unchanged

    # A refiner with its own VAE: other latents, other keys, and a refusal naming both models.
    alone = load_components(str(build_tiny_refiner(tmp_path / "own-vae", seed=1)), with_unet=False)
    assert not same_vae(base, alone)
    assert LatentCache(alone.vae, seed=0, batch_size=2).key_for(*items[0]) != base_cache.key_for(*items[0])
    with pytest.raises(ConfigError, match=r"expert 0 \(.*tiny-sdxl\) and expert 1 \(.*own-vae\) have different "
                                          r"VAEs.*replace the vae/ folder"):
        check_shared_vae([base, alone], ["expert 0", "expert 1"])


def test_refiner_time_ids_are_diffusers_add_time_ids(refiner_pipe) -> None:
    cached = torch.tensor([[96.0, 80.0, 8.0, 4.0, 64.0, 64.0]])
    positive, negative = refiner_pipe._get_add_time_ids(
        (96, 80), (8, 4), (64, 64), 6.0, 2.5, (96, 80), (8, 4), (64, 64), dtype=torch.float32,
        text_encoder_projection_dim=refiner_pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(TimeIdLayout(6.0)(cached), positive)
    assert torch.equal(refiner_time_ids(cached, 2.5), negative)
    assert torch.equal(TimeIdLayout()(cached), cached) and (TimeIdLayout().count, TimeIdLayout(6.0).count) == (6, 5)


def test_one_run_data_serves_a_refiner_expert_with_its_own_embeddings(models, tiny_model_dir: Path,
                                                                      small_dataset: Path, tmp_path: Path) -> None:
    from expertune.config import load_config
    from expertune.prepare import prepare_data, prepared_for_model
    from expertune.data.captioned import write_dataloader_config
    from expertune.models.tiny import build_tiny_refiner

    base, refiner = models
    dataloader = write_dataloader_config(tmp_path / "dataloader.json", small_dataset.parent / "images",
                                         tmp_path / "cache", resolution=64)
    config, _ = load_config([f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={dataloader}",
                             "--resolution=64", "--data_aesthetic_score=4.5"])
    prepared = prepare_data(config, base, extra_prompts=["a validation prompt"], progress=False)
    view = prepared_for_model(prepared, config, refiner, name="expert 1", extra_prompts=["a validation prompt"],
                              progress=False)
    assert view.items == prepared.items and view.buckets == prepared.buckets
    assert (view.cache_stats["embeds_encoded"], view.cache_stats["embeds_reused"]) == (7, 0)
    item = view.items[0]
    base_latent, base_ids = prepared.latent_cache.load(item.record, item.spec)
    latent, ids = view.latent_cache.load(item.record, item.spec)
    assert torch.equal(latent, base_latent) and ids.tolist() == [*base_ids[:4].tolist(), 4.5]
    assert view.embed_cache.load(item.captions[0])[0].shape == (77, 32)
    assert prepared.embed_cache.load(item.captions[0])[0].shape == (77, 48)  # the base's view is unchanged
    assert prepared_for_model(prepared, config, refiner, name="expert 1",
                              progress=False).cache_stats["embeds_encoded"] == 0
    alone = load_components(str(build_tiny_refiner(tmp_path / "own-vae", seed=1)), with_unet=False)
    with pytest.raises(ConfigError, match=r"expert 1 \(.*own-vae\) has another VAE than the one this run's "
                                          r"latents were encoded with"):
        prepared_for_model(prepared, config, alone, name="expert 1", progress=False)
