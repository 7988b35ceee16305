"""Caches shared by every job: VAE latents and text embeddings in one content-addressed store format."""

from expertune.cache.embeds import EmbedCache, encode_prompts, tokenizer_digest
from expertune.cache.latents import LatentCache
from expertune.cache.store import CacheStats, CacheStore, cache_key, file_digest, module_fingerprint

__all__ = [
    "CacheStats",
    "CacheStore",
    "EmbedCache",
    "LatentCache",
    "cache_key",
    "encode_prompts",
    "file_digest",
    "module_fingerprint",
    "tokenizer_digest",
]
