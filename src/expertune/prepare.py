"""Everything a run needs before its first step: datasets discovered, images bucketed, caches complete.

`prepare_data` is the one path that both `expertune train` and `expertune cache` take, so the cache
verb builds exactly the entries a run of the same config will look up, and prints the same stats:

1. read the dataloader JSON and find every captioned image (`discover_records`: a directory walk, or
   one listing of an `aws` entry's bucket);
2. read each image's header and hash its bytes — unless the persistent file index (`data.file_index`,
   `<cache dir>/file_index.jsonl`) knows the file unchanged; an `aws` image is fetched first, and only
   then; skip what cannot be read, what is over the pixel limit, and what `minimum_image_size` /
   `maximum_image_size` leave out; plan each image's bucket and crop (`BucketRule`);
3. encode the missing latents (an image that fails to decode is skipped; an `aws` image whose latent
   is missing is fetched first), then the missing text embeddings of every caption and validation prompt;
4. group the items into buckets (one dataset, one size) and log the bucket table.

Every image left out is logged with its file and reason and returned in `skipped` (run.json lists
them); the run goes on while at least one image is usable and stops with a DataError when none is.
"""

from __future__ import annotations


import contextlib
import functools
import gc
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from expertune.cache.embeds import EmbedCache
from expertune.cache.masks import MaskCache
from expertune.cache.latents import LatentCache, LatentPlan
from expertune.cache.store import CacheStore
from expertune.config.schema import required
from expertune.data.batches import Bucket, TimeIdLayout, TrainingItem
from expertune.data.holdout import split_holdout
from expertune.data.buckets import format_size
from expertune.data.dataloader import DataloaderConfig, DatasetDefaults, DatasetSpec, load_dataloader_config
from expertune.data.file_index import INDEX_NAME, FileIndex
from expertune.data.records import ImageRecord, discover_records
from expertune.errors import DataError
from expertune.models.sdxl import SDXLComponents

if TYPE_CHECKING:
    from expertune.config.schema import Config

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    dataloader: DataloaderConfig
    items: list[TrainingItem]
    latent_cache: LatentCache
    embed_cache: EmbedCache
    cache_stats: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    eval_items: list[TrainingItem] = field(default_factory=list)  # held out from `items`, each image once
    mask_cache: MaskCache | None = None  # issue 23: loss masks of the datasets that have them

    @property
    def unique_items(self) -> list[TrainingItem]:
        """Each image once, whatever its dataset's `repeats`."""
        seen: dict[tuple[str, Path], TrainingItem] = {}
        for item in self.items:
            seen.setdefault((item.spec.id, item.record.path), item)
        return list(seen.values())

    @property
    def bucket_table(self) -> list[dict[str, Any]]:
        """One row per bucket: dataset, width, height, distinct images, samples per epoch (with repeats)."""
        rows = []
        for bucket in self.buckets:
            images = {self.items[index].record.path for index in bucket.indices}
            rows.append({
                "dataset": bucket.dataset,
                "width": bucket.size[1],
                "height": bucket.size[0],
                "images": len(images),
                "samples": len(bucket.indices),
            })
        return rows


def load_datasets(config: Config) -> DataloaderConfig:
    """The dataloader JSON of `config`, with the run's settings as defaults for every entry."""
    d = config.data
    cache_root = config.resolved_cache_dir()
    defaults = DatasetDefaults(
        resolution=d.resolution,
        resolution_type=d.resolution_type,
        minimum_image_size=d.minimum_image_size,
        aspect_bucket_rounding=d.aspect_bucket_rounding,
    )
    return load_dataloader_config(
        required(d.data_backend_config, "data_backend_config"), default_resolution=d.resolution, default_cache_dir=cache_root, defaults=defaults
    )


class _Skips:
    """The images left out of a run, each with its dataset and reason (logged once)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []

    def add(self, spec: DatasetSpec, path: Path, reason: str, *, logged: bool = False) -> None:
        reason = reason.removeprefix(f"{path}: ")  # DataErrors name the file; the entry already does
        if not logged:
            log.warning("dataset %r: skipping %s: %s", spec.id, path, reason)
        self.entries.append({"path": str(path), "reason": reason, "dataset": spec.id})


@contextlib.contextmanager
def _cycle_collector_paused(paused: bool = True) -> Iterator[None]:
    """Pause Python's cycle collector over a loop that makes a few small objects per image and no cycles:
    with a model loaded, each full collection walks the model's objects too (half a warm restart's time on
    a 20,000-image folder). Not over a bucket's listing and fetches, whose clients do make cycles."""
    was_enabled = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _collector_sees_only_new_objects() -> Iterator[None]:
    """Hide every object alive now (the loaded models, the imported libraries) from Python's cycle collector until
    the block ends (`gc.freeze`, then `gc.unfreeze`): each full collection the block's allocations set off then
    walks the block's own objects, not a model's and its libraries' too. Nothing is lost: what is frozen is only
    skipped, and collected as usual after the block. Left alone when something else has frozen objects."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _plan_images(dataloader: DataloaderConfig, latent_cache: LatentCache, skips: _Skips, progress: bool
                 ) -> tuple[list[tuple[DatasetSpec, list[ImageRecord]]], dict[tuple[str, Path], LatentPlan]]:
    """Steps 1-2: every dataset's records with captions, then each image's header, hash, size limits and crop
    plan; what cannot be used is added to `skips`."""
    found: list[tuple[DatasetSpec, list[ImageRecord]]] = []
    for spec in dataloader.datasets:
        with _cycle_collector_paused(spec.remote is None):
            records, left_out = discover_records(spec, latent_cache.index)
        for path, reason in left_out:
            skips.add(spec, path, reason, logged=True)  # discover_records logged it
        # An object the index does not know must be fetched to be hashed; a known one is not fetched.
        records = _fetched(spec, records, lambda record: not latent_cache.known(record), skips, latent_cache.index)
        found.append((spec, records))
    planned: dict[tuple[str, Path], LatentPlan] = {}
    total = sum(len(records) for _, records in found)
    with tqdm(total=total, desc="reading images", unit="img", disable=not progress or total == 0) as bar, \
            _cycle_collector_paused():
        for spec, records in found:
            rule = spec.rule
            for record, plan in latent_cache.plan_each(records, spec):
                bar.update(1)
                if isinstance(plan, DataError):  # empty, not an image, over the pixel limit
                    skips.add(spec, record.path, str(plan))
                    continue
                problem = rule.size_problem(plan.plan.original_size)
                if problem is not None:
                    skips.add(spec, record.path, problem)
                    continue
                planned[(spec.id, record.path)] = plan
    return found, planned


def _fetched(spec: DatasetSpec, records: list[ImageRecord], needed: Callable[[ImageRecord], bool],
             skips: _Skips, index: FileIndex) -> list[ImageRecord]:
    """`records`, with the objects of an `aws` entry that `needed` picks fetched into the local mirror
    (`data.mirror`: concurrently, atomically, unless the listed version is there); failures are skipped."""
    if spec.remote is None:
        return records
    from expertune.data.mirror import fetch_records

    failures = fetch_records(spec, [record for record in records if needed(record)], index)
    kept = []
    for record in records:
        if record.remote_key in failures:
            skips.add(spec, record.path, failures[record.remote_key])
        else:
            kept.append(record)
    return kept


def prepare_data(
    config: Config, components: SDXLComponents, extra_prompts: list[str] | None = None, *, progress: bool = True
) -> PreparedData:
    """Read the datasets, bucket the images, and make sure every latent and embedding is cached.

    `extra_prompts` (validation prompts) are cached too, so the text encoders can be released after.
    Only the VAE, the text encoders and the tokenizers of `components` are used. Images held out for
    evaluation (`eval_dataset_id` / `eval_holdout_fraction`) are cached but left out of `items`; they
    are `eval_items`.
    """
    with _collector_sees_only_new_objects():
        return _prepare(config, components, extra_prompts, progress)


def _prepare(config: Config, components: SDXLComponents, extra_prompts: list[str] | None, progress: bool
             ) -> PreparedData:
    dataloader = load_datasets(config)
    index = FileIndex(config.resolved_cache_dir() / INDEX_NAME)
    latent_cache = LatentCache(components.vae, seed=config.train.seed, batch_size=config.data.vae_batch_size,
                               index=index, time_ids=time_id_layout(config, components),
                               flip=config.data.flip_images)  # issue 23
    skips = _Skips()
    skipped, skip = skips.entries, skips.add
    found, planned = _plan_images(dataloader, latent_cache, skips, progress)
    index.flush()

    # 3. Latents (an image that fails to decode is left out), then text embeddings.
    def lacks_latent(spec: DatasetSpec, records: list[ImageRecord]) -> Callable[[ImageRecord], bool]:
        """Whether a record's latent is missing; the store is asked once, at the first question (a local entry
        fetches nothing and never asks)."""
        absent = functools.cache(lambda: latent_cache.store_for(spec).missing(
            planned[(spec.id, record.path)].key for record in records))
        return lambda record: planned[(spec.id, record.path)].key in absent()

    for position, (spec, records) in enumerate(found):
        records = [record for record in records if (spec.id, record.path) in planned]
        found[position] = (spec, _fetched(spec, records, lacks_latent(spec, records), skips, index))
    index.flush()
    kept = [(record, spec) for spec, records in found for record in records if (spec.id, record.path) in planned]
    latent_stats = latent_cache.ensure(kept, progress=progress)
    failed = dict(latent_stats.failed)
    for record, spec in kept:
        if str(record.path) in failed:
            skip(spec, record.path, failed[str(record.path)])
    mask_cache = MaskCache(latent_cache)  # issue 23: a missing or wrong mask skips its image, listed
    mask_failed = mask_cache.ensure([(r, s) for r, s in kept if s.has_masks and str(r.path) not in failed])
    for record, spec in kept:
        if str(record.path) in mask_failed:
            skip(spec, record.path, mask_failed[str(record.path)])
    failed |= mask_failed
    usable = [(record, spec) for record, spec in kept if str(record.path) not in failed]
    if not usable:
        raise DataError(_nothing_usable(dataloader, skipped))

    items: list[TrainingItem] = []
    for record, spec in usable:
        items.extend(TrainingItem(record, spec) for _ in range(1 + spec.repeats))
    v = config.validation
    items, eval_items = split_holdout(
        items, eval_dataset_id=v.eval_dataset_id, fraction=v.eval_holdout_fraction, seed=config.train.seed,
        dataset_ids=[spec.id for spec in dataloader.datasets],
    )
    if eval_items:
        log.info("%d images held out of training for the per-band validation loss", len(eval_items))
    buckets = _buckets(items, planned)

    embed_cache = build_embed_cache(config, components, dataloader)
    captions = sorted({caption for record, _ in usable for caption in record.captions} | set(extra_prompts or []))
    embed_stats = embed_cache.ensure(captions, progress=progress)
    stats = {
        "latents_encoded": latent_stats.encoded,
        "latents_reused": latent_stats.reused,
        "embeds_encoded": embed_stats.encoded,
        "embeds_reused": embed_stats.reused,
    }
    if mask_cache.encoded or mask_cache.reused:
        stats |= {"masks_encoded": mask_cache.encoded, "masks_reused": mask_cache.reused}
    prepared = PreparedData(dataloader, items, latent_cache, embed_cache, stats, skipped, buckets, eval_items,
                            mask_cache)
    for spec in dataloader.datasets:
        count = sum(1 for _, s in usable if s.id == spec.id)
        left = sum(1 for entry in skipped if entry["dataset"] == spec.id)
        log.info("dataset %r: %d images (%d repeats), %d skipped", spec.id, count, spec.repeats, left)
    _log_bucket_table(prepared, config.train.train_batch_size * config.train.num_processes)
    log.info("cache: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    return prepared


def build_embed_cache(config: Config, components: SDXLComponents, dataloader: DataloaderConfig) -> EmbedCache:
    """The text-embedding cache of `components`' layout in the dataloader's text-embeds store (text encoders held).

    The refiner layout's entries (text encoder 2 only) are keyed apart from the base layout's in the same store.
    """
    if any(encoder is None for encoder in components.text_encoders):
        raise RuntimeError("text encoders were released before the embedding cache was built")
    return EmbedCache(
        components.tokenizers,  # type: ignore[arg-type]
        components.text_encoders,  # type: ignore[arg-type]
        store=CacheStore(dataloader.text_embeds.cache_dir),
        batch_size=config.data.text_encoder_batch_size,
    )


def prepared_for_model(prepared: PreparedData, config: Config, components: SDXLComponents, *, name: str,
                       extra_prompts: list[str] | None = None, progress: bool = True) -> PreparedData:
    """The run's data for another model of it (an expert of another layout, e.g. the SDXL refiner's): the same
    items, buckets and latents (read with that model's time ids), and that model's own text embeddings, encoded
    for every caption and `extra_prompts` now (its text encoders must still be held).

    Refuses (ConfigError naming `name`, both fingerprints and the fix) a model whose VAE differs from the one the
    latents were encoded with: its latents would be other entries, and a chain would hand it foreign latents.
    """
    from expertune.cache.store import module_fingerprint
    from expertune.errors import ConfigError

    latents = prepared.latent_cache
    fingerprint, dtype = module_fingerprint(components.vae), next(components.vae.parameters()).dtype
    if (fingerprint, dtype) != (latents.fingerprint, latents.dtype):
        raise ConfigError(
            f"{name} ({components.source}) has another VAE than the one this run's latents were encoded with "
            f"(fingerprints {fingerprint[:12]} and {latents.fingerprint[:12]}, dtypes {dtype} and {latents.dtype}): "
            "experts of one run share the latent cache and hand latents to each other. Use models that ship the "
            f"same VAE weights, or replace the vae/ folder of {components.source}")
    embed_cache = build_embed_cache(config, components, prepared.dataloader)
    captions = {caption for item in prepared.items + prepared.eval_items for caption in item.captions}
    stats = embed_cache.ensure(sorted(captions | set(extra_prompts or [])), progress=progress)
    log.info("%s: %d text embeddings encoded, %d reused (%s layout)", name, stats.encoded, stats.reused,
             components.layout_kind)
    view = replace(prepared, latent_cache=latents.with_time_ids(time_id_layout(config, components)),
                   embed_cache=embed_cache,
                   # What this view did: it reads the run's latents (encodes none) and has its own embeddings.
                   cache_stats={**prepared.cache_stats, "latents_encoded": 0,
                                "latents_reused": prepared.cache_stats.get("latents_encoded", 0)
                                + prepared.cache_stats.get("latents_reused", 0),
                                "embeds_encoded": stats.encoded, "embeds_reused": stats.reused})
    return view


def time_id_layout(config: Config, components: SDXLComponents) -> TimeIdLayout:
    """The added time ids the model's UNet takes: SDXL's six, or the refiner's five with `data_aesthetic_score`."""
    return TimeIdLayout(config.data.data_aesthetic_score if components.requires_aesthetics_score else None)


def _buckets(items: list[TrainingItem], planned: dict[tuple[str, Path], LatentPlan]) -> list[Bucket]:
    """Item indices grouped by (dataset, training size), datasets in file order, sizes sorted."""
    order = {item.spec.id: position for position, item in reversed(list(enumerate(items)))}
    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    weights: dict[str, float] = {}
    for index, item in enumerate(items):
        size = planned[(item.spec.id, item.record.path)].plan.target_size
        groups.setdefault((item.spec.id, size), []).append(index)
        weights[item.spec.id] = item.spec.probability
    keys = sorted(groups, key=lambda key: (order[key[0]], key[1]))
    return [Bucket(dataset, size, tuple(groups[(dataset, size)]), weights[dataset]) for dataset, size in keys]


def _log_bucket_table(prepared: PreparedData, global_batch: int) -> None:
    rows = prepared.bucket_table
    width = max([len("dataset"), *(len(row["dataset"]) for row in rows)])
    lines = [f"  {'dataset':<{width}}  {'bucket (w x h)':>14}  {'images':>7}  {'samples':>7}"]
    small = []
    for row in rows:
        size = format_size((row["height"], row["width"]))
        lines.append(f"  {row['dataset']:<{width}}  {size:>14}  {row['images']:>7}  {row['samples']:>7}")
        if row["samples"] < global_batch:
            small.append(f"{row['dataset']} {size} ({row['samples']})")
    log.info("aspect buckets (%d):\n%s", len(rows), "\n".join(lines))
    if small:
        log.info(
            "%d bucket(s) hold fewer samples than a batch of %d and are served as smaller batches: %s",
            len(small), global_batch, ", ".join(small),
        )


def _nothing_usable(dataloader: DataloaderConfig, skipped: list[dict[str, str]]) -> str:
    shown = "; ".join(f"{entry['path']}: {entry['reason']}" for entry in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return (
        f"no usable image in the datasets of {dataloader.source}: all {len(skipped)} images were skipped: "
        f"{shown}{more}. Fix or replace the files (each is named in the log above)."
    )


def cache_only(config: Config, extra_prompts: list[str] | None = None, *, progress: bool = True) -> PreparedData:
    """What `expertune cache` does: load only the VAE, text encoders and tokenizers, and prepare the data.

    The same `prepare_data` as training; given the same validation prompts (`validate.plan.prompt_texts`,
    which the `cache` verb passes), a later `train` of the same config encodes nothing.
    """
    from expertune.models.sdxl import load_components

    config.require("build the caches", ("pretrained_model_name_or_path", "data_backend_config"))
    components = load_components(
        required(config.model.pretrained_model_name_or_path, "pretrained_model_name_or_path"),
        revision=config.model.revision,
        variant=config.model.variant,
        with_unet=False,
        single_file_config=config.model.single_file_config,
        cache_dir=config.resolved_cache_dir(),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for frozen in components.frozen_modules():
        frozen.to(device)
    prepared = prepare_data(config, components, extra_prompts=extra_prompts, progress=progress)
    for index, source in expert_model_sources(config, components.source):
        other = load_components(source, revision=config.model.revision, variant=config.model.variant,
                                with_unet=False, single_file_config=config.model.single_file_config,
                                cache_dir=config.resolved_cache_dir())  # a mixture expert's own model: its embeddings too
        for frozen in other.frozen_modules():
            frozen.to(device)
        prepared_for_model(prepared, config, other, name=f"expert_models entry {index}", extra_prompts=extra_prompts,
                           progress=progress)
    return prepared


def expert_model_sources(config: Config, main_source: str) -> list[tuple[int, str]]:
    """(first expert index, model) of each distinct `expert_models` entry other than the run's own model."""
    plan = config.mixture_plan
    if plan is None or config.mixture.expert_models is None:
        return []
    firsts: dict[str, int] = {}
    for index, source in enumerate(plan.model_sources(config.model.pretrained_model_name_or_path, main_source)):
        firsts.setdefault(source, index)
    return [(index, source) for source, index in firsts.items() if source != main_source]
