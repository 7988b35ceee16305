"""Datasets: the dataloader JSON, image records with captions, and square crops with SDXL time ids."""

from expertune.data.records import (
    DataloaderConfig,
    DatasetSpec,
    Discovery,
    ImageRecord,
    SkippedImage,
    TextEmbedsSpec,
    discover_records,
    load_dataloader_config,
)
from expertune.data.transforms import CropPlan, image_size, image_to_tensor, load_image, plan_crop

__all__ = [
    "CropPlan",
    "DataloaderConfig",
    "DatasetSpec",
    "Discovery",
    "ImageRecord",
    "SkippedImage",
    "TextEmbedsSpec",
    "discover_records",
    "image_size",
    "image_to_tensor",
    "load_dataloader_config",
    "load_image",
    "plan_crop",
]
