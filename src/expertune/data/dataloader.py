"""The dataloader JSON (SimpleTuner's format), turned into typed dataset specs.

`load_dataloader_config` turns the JSON list into typed specs, rejecting what expertune cannot honour
with a message that names the file, the entry, the field and the fix. How each dataset sizes its images
is its `BucketRule` (`expertune.data.buckets`); finding the images of a dataset is `data.records`.
See docs/datasets.md.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertune.data.buckets import ALIGNMENTS, CROP_ASPECTS, CROP_STYLES, DEFAULT_ALIGNMENT, RESOLUTION_TYPES, BucketRule
from expertune.errors import ConfigError
from expertune.redaction import remember_secret
from expertune.resolution import (
    implausible_megapixels,
    nearest_multiples_of_8,
    resolution_problem,
    resolution_value,
)

logger = logging.getLogger(__name__)

CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt")
DEFAULT_CAPTION_STRATEGY = "filename"  # SimpleTuner's default for `--caption_strategy`

# Fields read from an image entry / a text_embeds entry. Anything else is logged and ignored.
_IMAGE_FIELDS = frozenset(
    {
        "id", "type", "dataset_type", "disabled", "disable", "instance_data_dir", "caption_strategy",
        "instance_prompt", "resolution", "resolution_type", "crop", "crop_style", "crop_aspect",
        "cache_dir_vae", "repeats", "disable_validation", "probability", "minimum_image_size",
        "maximum_image_size", "target_downsample_size", "aspect_bucket_alignment", "manifest", "exclude_file",
        "conditioning_data", "alpha_mask",  # issue 23: loss masks
    }
)
_TEXT_EMBEDS_FIELDS = frozenset({"id", "type", "dataset_type", "disabled", "disable", "default", "cache_dir"})
# SimpleTuner's `"type": "aws"` entry: an S3-compatible bucket (see docs/storage.md).
_AWS_FIELDS = frozenset(
    {
        "aws_bucket_name", "aws_region_name", "aws_endpoint_url", "aws_access_key_id", "aws_secret_access_key",
        "aws_data_prefix", "aws_max_object_bytes",
    }
)
DEFAULT_MAX_OBJECT_BYTES = 256 * 2**20  # aws_max_object_bytes: a larger object is skipped, never downloaded
BACKENDS = ("local", "aws")


@dataclass(frozen=True)
class S3Location:
    """Where an `aws` entry's objects are, and how to reach them. A None credential, region or endpoint
    falls back to boto's own chain: AWS_* environment variables, ~/.aws/config and ~/.aws/credentials."""

    bucket: str
    prefix: str = ""  # aws_data_prefix: only keys under it; keys are named relative to it
    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # aws_max_object_bytes: larger objects are skipped

    def url(self, key: str = "") -> str:
        """`s3://bucket/key` of an object (`key` is the full object key)."""
        return f"s3://{self.bucket}/{key}"

@dataclass(frozen=True)
class DatasetSpec:
    """One image dataset of the dataloader JSON, with every default filled in."""

    id: str
    instance_data_dir: Path
    caption_strategy: str  # textfile | filename | instanceprompt
    instance_prompt: str | None
    resolution: float  # pixels (pixel, pixel_area) or megapixels (area): see expertune.data.buckets
    crop_style: str  # center | random | corner
    cache_dir_vae: Path
    repeats: int  # extra passes over the dataset per epoch (SimpleTuner meaning): 0 = seen once
    disable_validation: bool
    resolution_type: str = "pixel"  # pixel | area | pixel_area
    crop: bool = True
    crop_aspect: str = "square"  # square | preserve
    alignment: int = DEFAULT_ALIGNMENT  # bucket edges are multiples of this
    minimum_image_size: float | None = None  # smaller images are skipped (unit of resolution_type)
    maximum_image_size: float | None = None  # larger images are skipped (unit of resolution_type)
    probability: float = 1.0  # relative weight of this dataset when batches are interleaved
    aspect_rounding: int | None = None  # decimal places of aspect ratios (--aspect_bucket_rounding)
    remote: S3Location | None = None  # an `aws` entry: objects are fetched into instance_data_dir (a local mirror)
    manifest: Path | None = None  # JSONL/CSV/Parquet of the images: no walk, no listing (data.manifest)
    exclude_file: Path | None = None  # images to leave out, one per line (`expertune audit --write-exclude`)
    # issue 23 (knobs): loss masks
    mask_dir: Path | None = None  # the folder of the `conditioning_type: mask` dataset this one names
    alpha_mask: bool = False  # the image's own alpha channel is its loss mask (kohya's alpha_mask)

    @property
    def has_masks(self) -> bool:
        return self.mask_dir is not None or self.alpha_mask

    @property
    def rule(self) -> BucketRule:
        """How this dataset's images are bucketed and cropped."""
        return BucketRule(
            resolution=self.resolution,
            resolution_type=self.resolution_type,
            crop=self.crop,
            crop_aspect=self.crop_aspect,
            crop_style=self.crop_style,
            alignment=self.alignment,
            minimum_image_size=self.minimum_image_size,
            maximum_image_size=self.maximum_image_size,
            aspect_rounding=self.aspect_rounding,
        )


@dataclass(frozen=True)
class TextEmbedsSpec:
    """Where the text-embedding cache lives (shared by every dataset and both experts)."""

    id: str
    cache_dir: Path


@dataclass(frozen=True)
class DataloaderConfig:
    source: Path
    datasets: tuple[DatasetSpec, ...]
    text_embeds: TextEmbedsSpec


# --------------------------------------------------------------------------------------------------
# The dataloader JSON


class _Entry:
    """One JSON object of the list, with helpers whose errors name file, entry and field."""

    def __init__(self, source: Path, index: int, raw: dict[str, Any]) -> None:
        self.source, self.index, self.raw = source, index, raw
        entry_id = raw.get("id")
        self.label = f"entry {index} (id {entry_id!r})" if isinstance(entry_id, str) else f"entry {index} (no id)"

    def error(self, field: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.label}, field {field!r}: {problem}. {fix}")

    def has(self, field: str) -> bool:
        return field in self.raw and self.raw[field] is not None

    def string(self, field: str, *, required: bool = False, default: str | None = None) -> str | None:
        if not self.has(field):
            if required:
                raise self.error(field, "is missing", f"Add \"{field}\": \"...\" to this entry.")
            return default
        value = self.raw[field]
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"must be a non-empty string, got {value!r}", f"Set \"{field}\" to a string.")
        return value

    def integer(self, field: str, *, default: int, minimum: int) -> int:
        if not self.has(field):
            return default
        value = self.raw[field]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(
                field, f"must be an integer >= {minimum}, got {value!r}", f"Set \"{field}\" to a whole number."
            )
        return value

    def number(self, field: str, *, default: float | None, minimum: float, strict: bool = False) -> float | None:
        """A JSON number >= minimum (> minimum when `strict`); whole numbers come back as int."""
        if not self.has(field):
            return default
        value = self.raw[field]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if ok:
            ok = value > minimum if strict else value >= minimum
        if not ok:
            relation = ">" if strict else ">="
            raise self.error(field, f"must be a number {relation} {minimum:g}, got {value!r}", f"Set \"{field}\" to a number.")
        return int(value) if float(value).is_integer() else float(value)

    def choice(self, field: str, choices: tuple[str, ...], *, default: str, hint: str = "") -> str:
        value = self.string(field, default=default)
        assert value is not None
        if value not in choices:
            raise self.error(field, f"{value!r} is not supported{hint}", f"Use one of {', '.join(choices)}.")
        return value

    def boolean(self, field: str, *, default: bool) -> bool:
        if not self.has(field):
            return default
        value = self.raw[field]
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}", f"Set \"{field}\" to true or false.")
        return value

    def path(self, field: str, *, default: Path | None = None) -> Path | None:
        value = self.string(field)
        if value is None:
            return default
        return _resolve(value)

    def warn_unknown(self, known: frozenset[str]) -> None:
        for field in sorted(set(self.raw) - known):
            logger.warning(
                "%s: %s: field %r is not used by expertune and is ignored", self.source, self.label, field
            )


def _resolve(value: str) -> Path:
    """Relative paths are relative to the current working directory, as in SimpleTuner."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


@dataclass(frozen=True)
class DatasetDefaults:
    """What an image entry gets for the fields it leaves out: the run's own settings."""

    resolution: float = 1024
    resolution_type: str = "pixel"
    minimum_image_size: float | None = None
    aspect_bucket_rounding: int | None = None


def _read_entries(source: Path) -> list[Any]:
    """The JSON list of a dataloader config file; ConfigError naming the file and the fix otherwise."""
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: dataloader config file not found. Point DATALOADER_CONFIG / --data_backend_config "
            "at an existing JSON file."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: cannot read the dataloader config ({exc}). Check the file and its permissions."
        ) from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. Fix the syntax there."
        ) from None
    if not isinstance(entries, list):
        raise ConfigError(
            f"{source}: the dataloader config must be a JSON list of dataset objects, got a "
            f"{type(entries).__name__}. Wrap the entries in [ ... ]."
        )
    return entries


def load_dataloader_config(
    path: str | os.PathLike,
    *,
    default_resolution: float,
    default_cache_dir: Path,
    defaults: DatasetDefaults | None = None,
) -> DataloaderConfig:
    """Read and validate a SimpleTuner-style dataloader JSON; raise ConfigError on anything unusable.

    Entries that leave out `resolution`, `resolution_type` or `minimum_image_size` take them from
    `defaults` (the run's --resolution, --resolution_type, --minimum_image_size); `default_resolution`
    wins over `defaults.resolution`.
    """
    base = defaults or DatasetDefaults()
    defaults = DatasetDefaults(
        resolution=default_resolution,
        resolution_type=base.resolution_type,
        minimum_image_size=base.minimum_image_size,
        aspect_bucket_rounding=base.aspect_bucket_rounding,
    )
    source = Path(path)
    entries = _read_entries(source)

    images: list[DatasetSpec] = []
    embeds: list[tuple[_Entry, bool]] = []
    masks: dict[str, Path] = {}  # id of a conditioning_type mask dataset -> its folder
    linked: list[_Entry] = []  # the image entries, in `images` order
    seen_ids: dict[str, int] = {}
    for index, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: entry {index} (no id): must be a JSON object {{...}}, got {type(raw).__name__}. "
                "Make every list item an object."
            )
        entry = _Entry(source, index, raw)
        entry_id = entry.string("id", required=True)
        assert entry_id is not None
        if entry_id in seen_ids:
            raise entry.error(
                "id", f"duplicates the id of entry {seen_ids[entry_id]}", "Give every entry a unique \"id\"."
            )
        seen_ids[entry_id] = index
        if entry.boolean("disabled", default=False) or entry.boolean("disable", default=False):
            logger.info("%s: %s is disabled and skipped", source, entry.label)
            continue
        kind = entry.string("dataset_type", default="image")
        backend = entry.string("type", default="local")
        if backend not in BACKENDS:
            raise entry.error(
                "type", f"{backend!r} is not supported",
                "Use \"type\": \"local\" with a directory on this machine, or \"aws\" with an S3-compatible bucket.",
            )
        if backend == "aws" and kind == "text_embeds":
            raise entry.error(
                "type", "a text_embeds cache in a bucket is not supported (caches stay on a local or shared "
                "file system)", "Use \"type\": \"local\" with a \"cache_dir\" for the text_embeds entry.",
            )
        if kind == "text_embeds":
            entry.warn_unknown(_TEXT_EMBEDS_FIELDS)
            embeds.append((entry, entry.boolean("default", default=False)))
        elif kind == "image":
            entry.warn_unknown(_IMAGE_FIELDS | (_AWS_FIELDS if backend == "aws" else frozenset()))
            remote = _s3_location(entry) if backend == "aws" else None
            images.append(_image_spec(entry, entry_id, defaults, default_cache_dir, remote))
            linked.append(entry)
        elif kind == "conditioning":  # issue 23: SimpleTuner's mask datasets (data/masks.py)
            masks[entry_id] = _mask_dir(entry, backend)
        else:
            raise entry.error(
                "dataset_type",
                f"{kind!r} is not supported",
                "Use \"image\" (or leave it out) for images, or \"text_embeds\" for the text-embedding cache.",
            )

    images = [_with_masks(spec, entry, masks) for spec, entry in zip(images, linked)]
    if not images:
        raise ConfigError(
            f"{source}: no enabled image dataset. Add an entry with \"type\": \"local\" and an "
            "\"instance_data_dir\" holding your images."
        )
    return DataloaderConfig(
        source=source, datasets=tuple(images), text_embeds=_text_embeds_spec(source, embeds, default_cache_dir)
    )


def _mask_dir(entry: _Entry, backend: str) -> Path:
    """The folder of a `"dataset_type": "conditioning"` entry, which must be a local `conditioning_type: mask`."""
    kind = entry.string("conditioning_type", default="mask")
    if kind != "mask":
        raise entry.error("conditioning_type", f"{kind!r} is not supported",
                          "expertune reads conditioning datasets of type \"mask\" only (loss masks).")
    if backend != "local":
        raise entry.error("type", "a mask dataset in a bucket is not supported", "Use \"type\": \"local\".")
    directory = entry.path("instance_data_dir")
    if directory is None or not directory.is_dir():
        raise entry.error("instance_data_dir", f"{directory} is not a directory",
                          "Point it at the folder of the masks (one per image, same names).")
    return directory


def _with_masks(spec: DatasetSpec, entry: _Entry, masks: dict[str, Path]) -> DatasetSpec:
    """`spec` with the loss masks its entry names (`conditioning_data`, `alpha_mask`)."""
    from dataclasses import replace

    linked = entry.string("conditioning_data")
    alpha = entry.boolean("alpha_mask", default=False)
    if linked is None and not alpha:
        return spec
    if linked is not None and alpha:
        raise entry.error("alpha_mask", "and conditioning_data both give the loss masks", "Use one of them.")
    if linked is not None and linked not in masks:
        raise entry.error("conditioning_data", f"names {linked!r}, which is not an enabled entry with "
                          "\"dataset_type\": \"conditioning\"", "Add the mask dataset, or fix the id.")
    return replace(spec, mask_dir=masks[linked] if linked is not None else None, alpha_mask=alpha)


def _s3_location(entry: _Entry) -> S3Location:
    """The bucket of an `aws` entry; a field left out falls back to boto's environment and config files."""
    bucket = entry.string("aws_bucket_name", required=True)
    assert bucket is not None
    if "/" in bucket or bucket.startswith("s3:") or bucket in (".", "..") or "\\" in bucket or "\0" in bucket:
        raise entry.error("aws_bucket_name", f"{bucket!r} is not a bucket name",
                          "Give the bare bucket name; put the folder in \"aws_data_prefix\".")
    endpoint = entry.string("aws_endpoint_url")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise entry.error("aws_endpoint_url", f"{endpoint!r} is not an http(s) URL",
                          "Give the full URL, e.g. \"https://s3.example.com\" (or leave it out for AWS itself).")
    key_id, secret = entry.string("aws_access_key_id"), entry.string("aws_secret_access_key")
    remember_secret(key_id)  # hidden from every log line (expertune.redaction)
    remember_secret(secret)
    if (key_id is None) != (secret is None):
        missing = "aws_secret_access_key" if secret is None else "aws_access_key_id"
        raise entry.error(missing, "is missing while its pair is given",
                          "Give both aws_access_key_id and aws_secret_access_key, or neither (then boto's "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials are used).")
    prefix = (entry.string("aws_data_prefix") or "").lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if prefix and any(part in ("", ".", "..") for part in prefix[:-1].split("/")):
        raise entry.error("aws_data_prefix", f"{prefix!r} has an empty, '.' or '..' folder (a '..' folder leaves "
                          "the mirror)",
                          "Give the folder as a/b/ (no '//', '.' or '..'): the mirror is laid out like the prefix.")
    return S3Location(bucket=bucket, prefix=prefix, region=entry.string("aws_region_name"), endpoint_url=endpoint,
                      access_key_id=key_id, secret_access_key=secret,
                      max_object_bytes=entry.integer("aws_max_object_bytes", default=DEFAULT_MAX_OBJECT_BYTES,
                                                     minimum=1))


def _mirror_dir(remote: S3Location, default_cache_dir: Path) -> Path:
    """The local folder an `aws` entry's objects are fetched into: `<cache dir>/objects/<bucket>/<prefix>`."""
    return default_cache_dir / "objects" / remote.bucket / remote.prefix


def _existing_file(entry: _Entry, field: str, suffixes: tuple[str, ...] | None = None) -> Path | None:
    path = entry.path(field)
    if path is None:
        return None
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise entry.error(field, f"{path.name} is not one of {', '.join(suffixes)}", "Name a file of one of these kinds.")
    if not path.is_file():
        raise entry.error(field, f"file {path} does not exist",
                          "Fix the path (relative paths are resolved against the current directory).")
    return path


def _image_spec(entry: _Entry, entry_id: str, defaults: DatasetDefaults, default_cache_dir: Path,
                remote: S3Location | None = None) -> DatasetSpec:
    from expertune.data.manifest import MANIFEST_FORMATS

    manifest = _existing_file(entry, "manifest", MANIFEST_FORMATS)
    exclude_file = _existing_file(entry, "exclude_file")
    directory = entry.path("instance_data_dir")
    if remote is None and directory is None and manifest is not None:
        directory = manifest.parent  # the manifest's relative paths are then relative to its folder
    if remote is not None:
        if directory is not None:
            raise entry.error("instance_data_dir", "is not used by an \"aws\" entry (its images are in the bucket)",
                              "Remove it; objects are fetched into <cache dir>/objects/<bucket>/<prefix>.")
        directory = _mirror_dir(remote, default_cache_dir)
    elif directory is None:
        raise entry.error(
            "instance_data_dir", "is missing", "Add \"instance_data_dir\": \"/path/to/images\" to this entry."
        )
    if remote is None and not directory.is_dir():
        raise entry.error(
            "instance_data_dir",
            f"directory {directory} does not exist",
            "Create it or fix the path (relative paths are resolved against the current directory).",
        )

    strategy = entry.choice("caption_strategy", CAPTION_STRATEGIES, default=DEFAULT_CAPTION_STRATEGY)
    instance_prompt = entry.string("instance_prompt")
    if strategy == "instanceprompt" and instance_prompt is None:
        raise entry.error(
            "instance_prompt",
            "is required by \"caption_strategy\": \"instanceprompt\"",
            "Add \"instance_prompt\": \"...\" or choose another caption_strategy.",
        )

    resolution_type = entry.choice("resolution_type", RESOLUTION_TYPES, default=defaults.resolution_type)
    alignment = entry.integer("aspect_bucket_alignment", default=DEFAULT_ALIGNMENT, minimum=8)
    if alignment not in ALIGNMENTS:
        raise entry.error(
            "aspect_bucket_alignment", f"{alignment} is not supported", f"Use one of {', '.join(map(str, ALIGNMENTS))}."
        )
    resolution = _resolution(entry, resolution_type, defaults.resolution)
    crop = entry.boolean("crop", default=True)
    crop_aspect = entry.choice("crop_aspect", CROP_ASPECTS, default="square",
                               hint=" (square crops, or aspect buckets that keep each image's shape)")
    crop_style = entry.choice("crop_style", CROP_STYLES, default="center")
    minimum, maximum = _size_limits(entry, resolution_type, defaults)

    probability = entry.number("probability", default=1.0, minimum=0, strict=True)
    assert probability is not None
    cache_dir_vae = entry.path("cache_dir_vae", default=default_cache_dir / "latents")
    assert cache_dir_vae is not None
    return DatasetSpec(
        id=entry_id,
        instance_data_dir=directory,
        caption_strategy=strategy,
        instance_prompt=instance_prompt,
        resolution=resolution,
        crop_style=crop_style,
        cache_dir_vae=cache_dir_vae,
        repeats=entry.integer("repeats", default=0, minimum=0),
        disable_validation=entry.boolean("disable_validation", default=False),
        resolution_type=resolution_type,
        crop=crop,
        crop_aspect=crop_aspect,
        alignment=alignment,
        minimum_image_size=minimum or None,
        maximum_image_size=maximum,
        probability=float(probability),
        aspect_rounding=defaults.aspect_bucket_rounding,
        remote=remote,
        manifest=manifest,
        exclude_file=exclude_file,
    )


def _size_limits(entry: _Entry, resolution_type: str, defaults: DatasetDefaults) -> tuple[float | None, float | None]:
    """(minimum_image_size, maximum_image_size) of an image entry, checked against each other and the
    resolution type; SimpleTuner's target_downsample_size pair is honoured by never skipping large images."""
    minimum = entry.number("minimum_image_size", default=defaults.minimum_image_size, minimum=0)
    maximum = entry.number("maximum_image_size", default=None, minimum=0, strict=True)
    if resolution_type == "area":
        for field, value in (("minimum_image_size", minimum), ("maximum_image_size", maximum)):
            if value is not None and implausible_megapixels(value):
                raise entry.error(
                    field,
                    f"{value:g} megapixels is implausible with \"resolution_type\": \"area\"",
                    "Give it in megapixels (e.g. 0.25), or use \"resolution_type\": \"pixel_area\" for pixels.",
                )
    if minimum and maximum is not None and maximum < minimum:
        raise entry.error("maximum_image_size", f"{maximum:g} is below minimum_image_size {minimum:g}",
                          "Raise maximum_image_size or lower minimum_image_size.")
    downsample = entry.number("target_downsample_size", default=None, minimum=0, strict=True)
    if maximum is not None and downsample is not None:
        # SimpleTuner's pair: "downsample larger images to target_downsample_size before cropping". expertune
        # always scales an image to its bucket before cutting, so large images are kept and downsampled anyway.
        logger.info(
            "%s: %s: maximum_image_size with target_downsample_size: larger images are downsampled to their "
            "bucket (expertune always scales to the bucket), not skipped", entry.source, entry.label,
        )
        maximum = None
    elif downsample is not None:
        logger.warning(
            "%s: %s: field 'target_downsample_size' has no effect without maximum_image_size and is ignored",
            entry.source, entry.label,
        )
    return minimum, maximum


def _resolution(entry: _Entry, resolution_type: str, default: float) -> float:
    resolution = entry.number("resolution", default=default, minimum=0, strict=True)
    assert resolution is not None
    source = "" if entry.has("resolution") else " (the run's --resolution, which this entry does not override)"
    problem = resolution_problem(resolution, resolution_type)
    if problem == "megapixels":
        raise entry.error(
            "resolution",
            f"{resolution:g}{source} with \"resolution_type\": \"area\" means {resolution:g} megapixels",
            "Give megapixels (1.0 is about 1024 x 1024), or use \"resolution_type\": \"pixel_area\" for an edge in pixels.",
        )
    if problem == "whole_pixels":
        raise entry.error(
            "resolution",
            f"{resolution!r}{source} is not a whole number of pixels >= 8 (resolution_type {resolution_type})",
            "Give pixels (e.g. 1024), or use \"resolution_type\": \"area\" for megapixels.",
        )
    if problem == "multiple_of_8":
        below, above = nearest_multiples_of_8(int(resolution))
        raise entry.error(
            "resolution",
            f"{int(resolution)}{source} is not a multiple of 8 (the VAE downsamples by 8)",
            f"Use {below} or {above}.",
        )
    return resolution_value(resolution, resolution_type)


def _text_embeds_spec(source: Path, embeds: list[tuple[_Entry, bool]], default_cache_dir: Path) -> TextEmbedsSpec:
    if not embeds:
        return TextEmbedsSpec(id="text-embeds", cache_dir=default_cache_dir / "text_embeds")
    defaults = [entry for entry, is_default in embeds if is_default]
    if len(defaults) > 1:
        raise defaults[1].error(
            "default",
            f"{defaults[0].label} is already the default text_embeds entry",
            "Keep \"default\": true on exactly one text_embeds entry.",
        )
    if not defaults and len(embeds) > 1:
        raise embeds[0][0].error(
            "default",
            f"{len(embeds)} text_embeds entries and none is marked default",
            "Add \"default\": true to the one to use.",
        )
    chosen = defaults[0] if defaults else embeds[0][0]
    for entry, _ in embeds:
        if entry is not chosen:
            logger.warning("%s: %s is not the default text_embeds entry and is ignored", source, entry.label)
    cache_dir = chosen.path("cache_dir", default=default_cache_dir / "text_embeds")
    assert cache_dir is not None
    return TextEmbedsSpec(id=str(chosen.raw["id"]), cache_dir=cache_dir)
