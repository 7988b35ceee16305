"""Caches shared by every job: VAE latents and text embeddings in one content-addressed store format."""

from expertune.cache.embeds import EmbedCache, encode_prompts, tokenizer_digest
from expertune.cache.latents import ImageInfo, LatentCache, LatentPlan
from expertune.cache.store import (
    CacheStats,
    CacheStore,
    EntryLock,
    Pending,
    cache_key,
    file_digest,
    fill_entries,
    module_fingerprint,
)

__all__ = [
    "CacheStats",
    "CacheStore",
    "EmbedCache",
    "EntryLock",
    "ImageInfo",
    "LatentCache",
    "LatentPlan",
    "Pending",
    "cache_key",
    "encode_prompts",
    "file_digest",
    "fill_entries",
    "module_fingerprint",
    "tokenizer_digest",
]
