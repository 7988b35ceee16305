"""Everything a run needs before its first step: datasets discovered, caches complete."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertune.cache.embeds import EmbedCache
from expertune.cache.latents import LatentCache
from expertune.cache.store import CacheStore
from expertune.data.batches import TrainingItem
from expertune.data.holdout import split_holdout
from expertune.data.records import DataloaderConfig, discover_records, load_dataloader_config
from expertune.errors import DataError
from expertune.models.sdxl import SDXLComponents

log = logging.getLogger("expertune.data")


@dataclass
class PreparedData:
    dataloader: DataloaderConfig
    items: list[TrainingItem]
    latent_cache: LatentCache
    embed_cache: EmbedCache
    cache_stats: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    eval_items: list[TrainingItem] = field(default_factory=list)  # held out from `items`, each image once

    @property
    def unique_items(self) -> list[TrainingItem]:
        """Each image once, whatever its dataset's `repeats`."""
        seen: dict[tuple[str, Path], TrainingItem] = {}
        for item in self.items:
            seen.setdefault((item.spec.id, item.record.path), item)
        return list(seen.values())


def prepare_data(config: Any, components: SDXLComponents, extra_prompts: list[str] | None = None) -> PreparedData:
    """Read the dataloader JSON, find the images, and make sure every latent and embedding is cached.

    `extra_prompts` (validation prompts) are cached too, so the text encoders can be released after.
    Images held out for evaluation (`eval_dataset_id` / `eval_holdout_fraction`) are cached but left out
    of `items`; they are `eval_items`.
    """
    from expertune.config.schema import default_cache_dir

    cache_root = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    dataloader = load_dataloader_config(
        config.data.data_backend_config, default_resolution=config.data.resolution, default_cache_dir=cache_root
    )
    items: list[TrainingItem] = []
    skipped: list[dict[str, str]] = []
    for spec in dataloader.datasets:
        records, left_out = discover_records(spec)
        skipped.extend({"path": str(path), "reason": reason, "dataset": spec.id} for path, reason in left_out)
        log.info("dataset %r: %d images (%d repeats), %d skipped", spec.id, len(records), spec.repeats, len(left_out))
        for record in records:
            items.extend(TrainingItem(record, spec) for _ in range(1 + spec.repeats))
    if not items:
        raise DataError(f"no usable images in the datasets of {dataloader.source}")
    v = config.validation
    training_items, eval_items = split_holdout(
        items, eval_dataset_id=v.eval_dataset_id, fraction=v.eval_holdout_fraction, seed=config.train.seed,
        dataset_ids=[spec.id for spec in dataloader.datasets],
    )
    if eval_items:
        log.info("%d images held out of training for the per-band validation loss", len(eval_items))

    latent_cache = LatentCache(components.vae, seed=config.train.seed, batch_size=config.data.vae_batch_size)
    unique = {(item.spec.id, item.record.path): item for item in items}
    latent_stats = latent_cache.ensure([(item.record, item.spec) for item in unique.values()])

    if components.text_encoder_1 is None or components.text_encoder_2 is None:
        raise RuntimeError("text encoders were released before the embedding cache was built")
    embed_cache = EmbedCache(
        (components.tokenizer_1, components.tokenizer_2),
        (components.text_encoder_1, components.text_encoder_2),
        store=CacheStore(dataloader.text_embeds.cache_dir),
        batch_size=config.data.text_encoder_batch_size,
    )
    captions = sorted({caption for item in unique.values() for caption in item.captions} | set(extra_prompts or []))
    embed_stats = embed_cache.ensure(captions)
    stats = {
        "latents_encoded": latent_stats.encoded,
        "latents_reused": latent_stats.reused,
        "embeds_encoded": embed_stats.encoded,
        "embeds_reused": embed_stats.reused,
    }
    log.info("cache: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    return PreparedData(dataloader, training_items, latent_cache, embed_cache, stats, skipped, eval_items)
