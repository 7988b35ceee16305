"""Datasets: the dataloader JSON, image records with captions, aspect buckets, crops with SDXL time ids."""

from expertune.data.buckets import BucketRule, format_size, megapixel_edge
from expertune.data.dataloader import (
    DataloaderConfig,
    DatasetDefaults,
    DatasetSpec,
    TextEmbedsSpec,
    load_dataloader_config,
)
from expertune.data.records import Discovery, ImageRecord, SkippedImage, discover_records
from expertune.data.transforms import (
    MAX_IMAGE_PIXELS,
    CropPlan,
    image_size,
    image_to_tensor,
    load_image,
    plan_crop,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BucketRule",
    "CropPlan",
    "DataloaderConfig",
    "DatasetDefaults",
    "DatasetSpec",
    "Discovery",
    "ImageRecord",
    "SkippedImage",
    "TextEmbedsSpec",
    "discover_records",
    "format_size",
    "image_size",
    "image_to_tensor",
    "load_dataloader_config",
    "load_image",
    "megapixel_edge",
    "plan_crop",
]
