"""The text-embedding cache: SDXL's prompt embeddings, one entry per caption and text layout.

`encode_prompts` reproduces diffusers' `StableDiffusionXLPipeline.encode_prompt` (clip_skip None,
no guidance): penultimate hidden states of both CLIP encoders concatenated (encoder 1 first), and the
pooled `text_embeds` of encoder 2. SSD-1B and SDXL share both encoders, so one cache serves both
experts and both models (REFERENCE.md §3).

The SDXL refiner layout has text encoder 2 only: given one tokenizer and one encoder, `encode_prompts` is
`StableDiffusionXLImg2ImgPipeline.encode_prompt` of a pipeline with `text_encoder=None` (bigG's penultimate
hidden states alone, and its pooled `text_embeds`). Its entries are of another kind
(`REFINER_EMBED_KIND`) and their keys name one encoder, so they never collide with base-layout entries of
the same caption, even in the same store and with the same text encoder 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from expertune.cache.store import (
    CacheStats,
    CacheStore,
    Encoded,
    Pending,
    cache_key_template,
    fill_entries,
    module_fingerprint,
)
from expertune.errors import DataError

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

EMBED_KIND = "sdxl_text_embeds"
REFINER_EMBED_KIND = "sdxl_refiner_text_embeds"  # text encoder 2 only (the SDXL refiner layout)
HIDDEN_LAYER = -2  # SDXL reads the penultimate layer (clip_skip None)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def encode_prompts(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel | CLIPTextModelWithProjection],
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, d1 + d2], pooled [B, d_pool]), as diffusers' SDXL `encode_prompt`.

    With one tokenizer and one encoder (the refiner layout: text encoder 2 only), prompt_embeds are
    [B, 77, d2]. Runs under `torch.no_grad()`; prompt_embeds take the last encoder's dtype, as in diffusers.
    """
    if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
        raise ValueError("SDXL needs two tokenizers and two text encoders (CLIP-L, then OpenCLIP bigG); the "
                         "refiner layout one of each (OpenCLIP bigG)")
    _warn_truncated(tokenizers[0], prompts)
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    with torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = encoder(ids.to(_device(encoder)), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = output[0]
            hidden.append(output.hidden_states[HIDDEN_LAYER])
    if pooled is None:
        raise ValueError("the second text encoder must return pooled text_embeds (CLIPTextModelWithProjection)")
    embeds = torch.cat(hidden, dim=-1).to(dtype=next(text_encoders[-1].parameters()).dtype)
    return embeds, pooled


def _warn_truncated(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> None:
    """Name every caption that CLIP will cut short: the words past its token limit are not learned."""
    limit = tokenizer.model_max_length
    for prompt, ids in zip(prompts, tokenizer(list(prompts), truncation=False).input_ids):
        if len(ids) > limit:
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            logger.warning("caption %r has %d tokens; CLIP keeps the first %d", shown, len(ids), limit)


def tokenizer_digest(tokenizer: CLIPTokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: vocabulary, merges, normalisation, special tokens.

    The backend's padding/truncation state is left out: transformers changes it on every call.
    """
    description: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        description["backend"] = state
    else:
        description["vocab"] = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class EmbedCache:
    """Encodes captions into `store` and reads them back; keys cover the caption, the layout and every encoder.

    Two tokenizers and encoders: the SDXL base layout. One of each (text encoder 2): the refiner layout, whose
    entries are of `REFINER_EMBED_KIND`.
    """

    def __init__(
        self,
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer] | tuple[CLIPTokenizer],
        text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection] | tuple[CLIPTextModelWithProjection],
        *,
        store: CacheStore,
        batch_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError("EmbedCache takes two tokenizers and encoders (SDXL base layout) or one of each "
                             "(the refiner layout's text encoder 2)")
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)
        self.store = store
        self.batch_size = int(batch_size)
        self.kind = EMBED_KIND if len(self.text_encoders) == 2 else REFINER_EMBED_KIND
        self._parts: dict[str, Any] = {
            "encoders": [module_fingerprint(encoder) for encoder in self.text_encoders],
            "encoder_dtypes": [str(next(encoder.parameters()).dtype) for encoder in self.text_encoders],
            "tokenizers": [tokenizer_digest(tokenizer) for tokenizer in self.tokenizers],
            "max_length": [tokenizer.model_max_length for tokenizer in self.tokenizers],
            "hidden_layer": HIDDEN_LAYER,
            "pooled": "text_embeds",
        }
        self._keys: dict[str, str] = {}
        self._key_of = cache_key_template(self.kind, self._parts, "caption")

    def key_for(self, caption: str) -> str:
        key = self._keys.get(caption)
        if key is None:
            key = self._keys[caption] = self._key_of(caption)
        return key

    def ensure(self, captions: Iterable[str], *, progress: bool = True) -> CacheStats:
        """Encode the distinct captions missing from the store, `batch_size` at a time.

        Safe beside other processes filling the same store (see `expertune.cache.store`).
        """
        distinct = list(dict.fromkeys(captions))
        absent = self.store.missing(self.key_for(caption) for caption in distinct)
        missing = [caption for caption in distinct if self.key_for(caption) in absent]
        written = found = 0
        if missing:
            pending = [Pending(self.key_for(caption), (self.store,), caption) for caption in missing]
            with tqdm(total=len(missing), desc="caching text embeddings", unit="caption", disable=not progress) as bar:
                result = fill_entries(pending, batch_size=self.batch_size, encode=self._encode_batch, progress=bar)
            written, found = result.written, result.found
            if result.failed:  # NonFiniteEntry: the text encoders gave NaN or infinity
                caption, reason = result.failed[0]
                raise DataError(f"caption {caption!r}: the text encoders' embedding is {reason.removeprefix('not cached: ')}"
                                f" ({len(result.failed)} caption(s) in all); nothing was cached for them. Check the text "
                                "encoders' weights and dtype (float32 avoids an fp16 overflow).")
        return CacheStats(encoded=written, reused=len(distinct) - len(missing) + found)

    def _encode_batch(self, batch: list[str]) -> list[Encoded | str]:
        embeds, pooled = encode_prompts(self.tokenizers, self.text_encoders, batch)
        return [
            ({"prompt_embeds": embed, "pooled_prompt_embeds": pool}, {"caption": caption, "kind": self.kind})
            for caption, embed, pool in zip(batch, embeds, pooled)
        ]

    def load(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [77, d1 + d2] (refiner: [77, d2]), pooled [d_pool]) of a cached caption, as float32."""
        key = self.key_for(caption)
        entry = self.store.get(key)
        tensors = entry[0] if entry is not None else {}
        embeds, pooled = tensors.get("prompt_embeds"), tensors.get("pooled_prompt_embeds")
        if embeds is None or pooled is None or embeds.ndim != 2 or pooled.ndim != 1:
            raise DataError(
                f"caption {caption!r}: no usable cached text embedding in {self.store.root} (key {key}). "
                "Run the text-embedding caching step (EmbedCache.ensure) for it first."
            )
        return embeds.to(torch.float32), pooled.to(torch.float32)
