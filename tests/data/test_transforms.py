from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertune.data.transforms import CropPlan, image_size, image_to_tensor, load_image, plan_crop
from expertune.errors import DataError


def test_center_crop_time_ids_by_hand() -> None:
    # A 100-wide, 60-high image at 32 px: the short side 60 -> 32, so 100 -> round(100 * 32 / 60) = 53;
    # the centre crop starts (53 - 32) // 2 = 10 pixels from the left.
    plan = plan_crop((60, 100), 32, "center", seed=0, image_key="k")
    assert plan == CropPlan(original_size=(60, 100), resized_size=(32, 53), crop_top_left=(0, 10), target_size=(32, 32))
    assert plan.time_ids() == (60, 100, 0, 10, 32, 32)
    # The same image standing up: the offset moves to the top.
    assert plan_crop((100, 60), 32, "center", 0, "k").time_ids() == (100, 60, 10, 0, 32, 32)
    assert plan_crop((60, 100), 32, "corner", 0, "k").crop_top_left == (0, 0)
    # Upscaling a small image and a square image.
    assert plan_crop((16, 16), 32, "center", 0, "k").time_ids() == (16, 16, 0, 0, 32, 32)


def test_random_crop_is_deterministic_per_seed_and_key() -> None:
    original = (100, 1000)  # resized to 32 x 320: 289 possible left offsets
    plans = {key: plan_crop(original, 32, "random", seed=7, image_key=key) for key in (f"img{i}" for i in range(8))}
    random.seed(123)
    torch.manual_seed(123)  # a global RNG must not matter
    again = {key: plan_crop(original, 32, "random", seed=7, image_key=key) for key in reversed(list(plans))}
    assert again == plans
    lefts = [plan.crop_top_left[1] for plan in plans.values()]
    assert len(set(lefts)) > 1, "different images must get different crops"
    assert all(plan.crop_top_left[0] == 0 and 0 <= left <= 320 - 32 for plan, left in zip(plans.values(), lefts))
    other_seed = [plan_crop(original, 32, "random", seed=8, image_key=key).crop_top_left for key in plans]
    assert other_seed != [plan.crop_top_left for plan in plans.values()]


def test_plan_rejects_unknown_style() -> None:
    with pytest.raises(ValueError, match="crop_style"):
        plan_crop((10, 10), 8, "face", 0, "k")


def test_image_to_tensor_crops_where_the_plan_says(tmp_path: Path) -> None:
    # Already at the resized size (32 x 53), so no resampling: column j holds the value 4 * j.
    columns = (np.arange(53, dtype=np.uint8) * 4)[None, :, None].repeat(32, axis=0).repeat(3, axis=2)
    image = Image.fromarray(columns, "RGB")
    plan = plan_crop((32, 53), 32, "center", 0, "k")
    assert plan.crop_top_left == (0, 10)
    tensor = image_to_tensor(image, plan)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    expected = torch.arange(10, 42, dtype=torch.float32) * 4 / 127.5 - 1
    torch.testing.assert_close(tensor[1, 5], expected)

    white = image_to_tensor(Image.new("RGB", (100, 60), (255, 255, 255)), plan_crop((60, 100), 32, "random", 1, "k"))
    assert white.shape == (3, 32, 32)
    torch.testing.assert_close(white, torch.ones_like(white))
    with pytest.raises(ValueError, match="plan expects"):
        image_to_tensor(image, plan_crop((60, 100), 32, "center", 0, "k"))


def test_exif_rotated_jpeg_gives_rotated_original_size(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    Image.new("RGB", (40, 20), (10, 200, 10)).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 40)
    assert image_size(path) == (40, 20)  # (h, w) as decoded, from the header alone
    plan = plan_crop(image_size(path), 16, "center", 0, "k")
    assert plan.original_size == (40, 20) and plan.time_ids()[:2] == (40, 20)
    assert image_to_tensor(image, plan).shape == (3, 16, 16)


def test_transparency_becomes_white_and_modes_become_rgb(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 4), 7).save(grey)
    assert load_image(grey).getpixel((1, 1)) == (7, 7, 7)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image(path)
    with pytest.raises(DataError, match="broken.png"):
        image_size(path)
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(truncated)
