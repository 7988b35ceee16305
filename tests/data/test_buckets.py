from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from expertune.data.buckets import BucketRule, format_size, megapixel_edge
from expertune.data.dataloader import DatasetDefaults, load_dataloader_config


def test_square_buckets_in_every_unit() -> None:
    assert BucketRule(1024).bucket_for((1000, 1500)) == (1024, 1024)
    assert BucketRule(1024, "pixel_area").bucket_for((10, 2000)) == (1024, 1024)
    assert BucketRule(1.0, "area").bucket_for((3000, 2000)) == (1024, 1024)
    # SimpleTuner's round megapixel values keep their meaning; others are (1024 sqrt(M))^2, 64-aligned.
    assert [megapixel_edge(m) for m in (0.25, 0.5, 1.0, 2.0, 4.0)] == [512, 768, 1024, 1536, 2048]
    assert BucketRule(0.5, "area").square_edge() == 768
    assert BucketRule(0.3, "area").square_edge() == 576  # 1024 * sqrt(0.3) = 560.9 -> 9 x 64
    assert BucketRule(1000, "pixel_area").square_edge() == 1024  # rounded to the alignment
    assert BucketRule(1000, "pixel_area", alignment=8).square_edge() == 1000


def test_aspect_buckets_by_hand() -> None:
    landscape, portrait = (1000, 1500), (1500, 1000)  # (height, width)
    # pixel: the shorter edge is the resolution, the longer one 1024 * 1.5 = 1536 (a multiple of 64).
    pixel = BucketRule(1024, crop_aspect="preserve")
    assert pixel.bucket_for(landscape) == (1024, 1536) and pixel.bucket_for(portrait) == (1536, 1024)
    # area 1.0 = 1024^2 pixels: h = sqrt(A / 1.5) = 836.1 -> 832, w = sqrt(A * 1.5) = 1254.1 -> 1280.
    area = BucketRule(1.0, "area", crop_aspect="preserve")
    assert area.bucket_for(landscape) == (832, 1280) and area.bucket_for(portrait) == (1280, 832)
    assert BucketRule(1024, "pixel_area", crop_aspect="preserve").bucket_for(landscape) == (832, 1280)
    # crop: false follows the image's shape whatever crop_aspect says.
    assert BucketRule(1.0, "area", crop=False).bucket_for(landscape) == (832, 1280)
    # Every edge is a multiple of the alignment.
    for alignment in (8, 32, 64):
        for size in [(1000, 1500), (333, 777), (2048, 512), (640, 641)]:
            h, w = BucketRule(1.0, "area", crop_aspect="preserve", alignment=alignment).bucket_for(size)
            assert h % alignment == 0 and w % alignment == 0, (alignment, size, h, w)
    # A 10:1 panorama is bucketed at 4:1 (and cropped to it).
    assert pixel.bucket_for((100, 1000)) == (1024, 4096)
    # --aspect_bucket_rounding: 1.4 rounded to 0 places is square.
    assert BucketRule(1.0, "area", crop_aspect="preserve").bucket_for((1000, 1400)) == (896, 1216)
    assert BucketRule(1.0, "area", crop_aspect="preserve", aspect_rounding=0).bucket_for((1000, 1400)) == (1024, 1024)


def test_plan_of_an_aspect_bucket_and_its_time_ids() -> None:
    # 1000 x 1500 (h x w) into 832 x 1280: scale max(0.832, 0.8533) -> 853 x 1280, 21 rows too many,
    # the centre crop starts at row 10.
    plan = BucketRule(1.0, "area", crop_aspect="preserve").plan((1000, 1500), seed=0, image_key="k")
    assert plan.resized_size == (853, 1280) and plan.crop_top_left == (10, 0)
    assert plan.time_ids() == (1000, 1500, 10, 0, 832, 1280)  # the true original size, the crop, the bucket
    corner = BucketRule(1.0, "area", crop_aspect="preserve", crop_style="corner").plan((1000, 1500), 0, "k")
    assert corner.crop_top_left == (0, 0)
    # crop: false always centres the (small) rounding cut, whatever crop_style says.
    uncropped = BucketRule(1.0, "area", crop=False, crop_style="corner").plan((1000, 1500), 0, "k")
    assert uncropped.crop_top_left == (10, 0)


def test_random_crops_are_frozen_by_seed_and_content() -> None:
    rule = BucketRule(512, crop_style="random")
    size = (600, 1200)  # 512 x 1024 after resizing: 513 possible left offsets
    plans = {key: rule.plan(size, seed=3, image_key=key) for key in ("a", "b", "c", "d", "e")}
    assert plans == {key: rule.plan(size, seed=3, image_key=key) for key in reversed("abcde")}
    lefts = {plan.crop_top_left[1] for plan in plans.values()}
    assert len(lefts) > 1 and all(0 <= left <= 512 for left in lefts)
    assert [rule.plan(size, 4, key) for key in plans] != list(plans.values())


def test_minimum_and_maximum_image_size_in_the_unit_of_resolution_type() -> None:
    pixel = BucketRule(1024, minimum_image_size=512, maximum_image_size=2048)
    assert "below minimum_image_size 512" in pixel.size_problem((400, 800))  # shorter edge 400
    assert "above maximum_image_size 2048" in pixel.size_problem((3000, 4000))
    assert pixel.size_problem((512, 4000)) is None and pixel.size_problem((2048, 2048)) is None
    area = BucketRule(1.0, "area", minimum_image_size=0.25)  # 0.25 megapixels = 512^2 = 262144 pixels
    assert "megapixels" in area.size_problem((400, 600))  # 240000 pixels
    assert area.size_problem((500, 600)) is None  # 300000 pixels
    pixel_area = BucketRule(1024, "pixel_area", minimum_image_size=512)
    assert pixel_area.size_problem((256, 1024)) is None  # an equal-area square of 512
    assert pixel_area.size_problem((255, 1024)) is not None
    assert BucketRule(1024, minimum_image_size=0).size_problem((1, 1)) is None


def test_rule_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="crop_aspect"):
        BucketRule(1024, crop_aspect="closest")
    with pytest.raises(ValueError, match="resolution_type"):
        BucketRule(1024, "megapixel")
    assert format_size((832, 1280)) == "1280x832"


def test_dataloader_fields_and_run_defaults(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    entries = [
        {"id": "defaults", "instance_data_dir": str(images)},
        {"id": "area", "instance_data_dir": str(images), "resolution": 0.5, "crop": False, "probability": 3,
         "aspect_bucket_alignment": 32, "maximum_image_size": 4, "repeats": 1},
        {"id": "simpletuner", "instance_data_dir": str(images), "resolution": 1024, "resolution_type": "pixel_area",
         "crop_aspect": "preserve", "crop_style": "random", "minimum_image_size": 768, "maximum_image_size": 2048,
         "target_downsample_size": 1024},
    ]
    path = tmp_path / "loader.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    defaults = DatasetDefaults(resolution_type="area", minimum_image_size=0.25, aspect_bucket_rounding=2)
    with caplog.at_level(logging.INFO, logger="expertune.data"):
        config = load_dataloader_config(path, default_resolution=1.0, default_cache_dir=tmp_path / "c", defaults=defaults)
    plain, area, simpletuner = config.datasets
    assert plain.rule == BucketRule(1.0, "area", minimum_image_size=0.25, aspect_rounding=2)
    assert area.rule == BucketRule(0.5, "area", crop=False, alignment=32, minimum_image_size=0.25,
                                   maximum_image_size=4, aspect_rounding=2)
    assert (area.probability, area.repeats) == (3.0, 1)
    # SimpleTuner's maximum_image_size + target_downsample_size downsamples large images: nothing is skipped.
    assert simpletuner.rule.maximum_image_size is None and simpletuner.rule.minimum_image_size == 768
    assert simpletuner.rule.resolution == 1024 and isinstance(simpletuner.rule.resolution, int)
    assert any("target_downsample_size" in r.getMessage() and "'simpletuner'" in r.getMessage() for r in caplog.records)
