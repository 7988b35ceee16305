from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from expertune.cache.embeds import EmbedCache, encode_prompts
from expertune.cache.store import CacheStats, CacheStore
from expertune.errors import DataError

PROMPTS = [
    "a red cube on a table",
    "",
    "a very long prompt " * 12,  # longer than 77 tokens: truncated the way diffusers truncates
]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), use_safetensors=True)


def _parts(pipe):
    return (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)


def test_encode_prompts_equals_diffusers_encode_prompt(pipe, caplog: pytest.LogCaptureFixture) -> None:
    tokenizers, encoders = _parts(pipe)
    caplog.set_level(logging.WARNING, logger="expertune.cache")
    for prompt in PROMPTS:
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds, pooled = encode_prompts(tokenizers, encoders, [prompt])
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert embeds.shape == (1, 77, width) and pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(embeds, expected)
        assert torch.equal(pooled, expected_pooled)
    truncated = [r.getMessage() for r in caplog.records if r.name.startswith("expertune.cache")]
    assert len(truncated) == 1 and "a very long prompt" in truncated[0] and "first 77" in truncated[0]
    batch, batch_pooled = encode_prompts(tokenizers, encoders, PROMPTS)
    singles = [encode_prompts(tokenizers, encoders, [prompt]) for prompt in PROMPTS]
    torch.testing.assert_close(batch, torch.cat([s[0] for s in singles]))
    torch.testing.assert_close(batch_pooled, torch.cat([s[1] for s in singles]))


def test_cache_loads_what_diffusers_computes_and_reuses_across_instances(pipe, tmp_path: Path) -> None:
    tokenizers, encoders = _parts(pipe)
    for tokenizer in tokenizers:  # the state of a tokenizer that never encoded anything
        tokenizer.backend_tokenizer.no_padding()
        tokenizer.backend_tokenizer.no_truncation()
    store = CacheStore(tmp_path / "text_embeds")
    cache = EmbedCache(tokenizers, encoders, store=store, batch_size=2)
    keys_before = [cache.key_for(p) for p in PROMPTS]
    assert cache.ensure(PROMPTS + PROMPTS[:1]) == CacheStats(encoded=3, reused=0)
    assert cache.ensure(PROMPTS) == CacheStats(encoded=0, reused=3)
    for prompt in PROMPTS:
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds, pooled = cache.load(prompt)
        assert embeds.dtype == pooled.dtype == torch.float32
        torch.testing.assert_close(embeds, expected[0])
        torch.testing.assert_close(pooled, expected_pooled[0])

    # A second instance (as in the stage-2 job) computes the same keys, even after the tokenizers
    # were used for encoding (transformers changes their padding state on every call).
    again = EmbedCache(tokenizers, encoders, store=CacheStore(tmp_path / "text_embeds"), batch_size=1)
    assert [again.key_for(p) for p in PROMPTS] == keys_before
    assert again.ensure(reversed(PROMPTS)) == CacheStats(encoded=0, reused=3)


def test_keys_follow_caption_and_encoder_weights(pipe, tmp_path: Path) -> None:
    tokenizers, encoders = _parts(pipe)
    store = CacheStore(tmp_path)
    cache = EmbedCache(tokenizers, encoders, store=store, batch_size=4)
    keys = {cache.key_for(p) for p in ["a cat", "a cat ", "A cat", "a dog"]}
    assert len(keys) == 4
    changed = copy.deepcopy(encoders[1])
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    other = EmbedCache(tokenizers, (encoders[0], changed), store=store, batch_size=4)
    assert other.key_for("a cat") != cache.key_for("a cat")
    swapped = EmbedCache((tokenizers[1], tokenizers[0]), encoders, store=store, batch_size=4)
    assert swapped.key_for("a cat") != cache.key_for("a cat")  # the two tokenizers pad differently


def test_load_before_ensure_is_a_clear_error(pipe, tmp_path: Path) -> None:
    tokenizers, encoders = _parts(pipe)
    cache = EmbedCache(tokenizers, encoders, store=CacheStore(tmp_path), batch_size=4)
    with pytest.raises(DataError, match="EmbedCache.ensure"):
        cache.load("never cached")


def test_an_embedding_that_is_not_finite_is_never_cached_and_stops_naming_the_caption(pipe, tmp_path: Path) -> None:
    tokenizers, encoders = _parts(pipe)
    broken = copy.deepcopy(encoders[1])
    with torch.no_grad():
        broken.text_model.final_layer_norm.weight.fill_(float("nan"))  # a damaged text encoder 2: real NaN output
    store = CacheStore(tmp_path / "text_embeds")
    cache = EmbedCache(tokenizers, (encoders[0], broken), store=store, batch_size=2)
    with pytest.raises(DataError, match=r"caption 'a red fox': the text encoders' embedding is tensor\(s\) "
                                        r".*hold NaN or infinity \(2 caption\(s\) in all\)"):
        cache.ensure(["a red fox", "a blue bird"], progress=False)
    assert not list(store.root.rglob("*.safetensors")) and store.journal() == []
