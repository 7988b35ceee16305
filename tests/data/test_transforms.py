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


def _png_header_claiming(path: Path, width: int, height: int) -> Path:
    """A 57-byte PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case, words", [
    ("zero-byte", "empty (0 bytes)"),
    ("not an image", "cannot read the image"),
    ("truncated png", "truncated"),
])
def test_bad_files_are_refused_naming_file_and_reason(tmp_path: Path, case: str, words: str) -> None:
    path = tmp_path / f"{case.replace(' ', '_')}.png"
    if case == "zero-byte":
        path.write_bytes(b"")
    elif case == "not an image":
        path.write_text("<html>a web page saved under an image name</html>")
    else:
        Image.effect_noise((64, 64), 50).convert("RGB").save(path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError) as info:
        load_image(path)
        image_size(path)  # the header alone already fails for the first two
    assert str(path) in str(info.value) and words in str(info.value)


def test_pixel_limit_refuses_bombs_from_the_header(tmp_path: Path) -> None:
    from expertune.data.transforms import MAX_IMAGE_PIXELS

    bomb = _png_header_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # 10 gigapixels in 57 bytes
    for read in (image_size, load_image):
        with pytest.raises(DataError, match=r"10000000000 pixels.*over the limit of 134,217,728") as info:
            read(bomb)
        assert str(bomb) in str(info.value) and "decompression bombs" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 2**27  # PIL's own guard set to the same value
    merely_big = _png_header_claiming(tmp_path / "big.png", 16_384, 8_193)  # above the limit, below PIL's error
    with pytest.raises(DataError, match=r"16384x8193 = 134,234,112 pixels is over the limit of 134,217,728"):
        image_size(merely_big)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    assert image_size(small, max_pixels=1200) == (30, 40)
    with pytest.raises(DataError, match="over the limit of 1,199"):
        load_image(small, max_pixels=1199)


def test_unusual_modes_are_converted_correctly(tmp_path: Path) -> None:
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(cmyk, quality=100)  # pure cyan ink
    red, green, blue = load_image(cmyk).getpixel((4, 4))
    assert red < 10 and green > 245 and blue > 245

    sixteen = tmp_path / "grey16.png"
    Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)).save(sixteen)
    with Image.open(sixteen) as raw:
        assert raw.mode.startswith("I")  # PIL's plain convert("RGB") would clip this to white
    assert load_image(sixteen).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257 = 155.6

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([220, 20, 20, 0, 0, 0] + [0] * 762)  # index 0 red, index 1 black (transparent)
    palette.putpixel((0, 0), 1)
    keyed = tmp_path / "palette.png"
    palette.save(keyed, transparency=1)
    decoded = load_image(keyed)
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((3, 3)) == (220, 20, 20)

    colour_key = tmp_path / "rgb_trns.png"
    Image.new("RGB", (4, 4), (0, 0, 0)).save(colour_key, transparency=(0, 0, 0))
    assert load_image(colour_key).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_pixels_are_scaled_in_integers_a_band_at_a_time(tmp_path: Path) -> None:
    import tracemalloc

    from expertune.data import transforms

    values = np.random.default_rng(3).integers(0, 65536, size=(1024, 1536), dtype=np.uint16)
    values[0, :4] = [0, 128, 129, 65535]  # the rounding edges
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        raw.load()
        tracemalloc.start()
        try:
            rgb = transforms._sixteen_bit_to_rgb(raw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    expected = np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)  # the float formula
    assert np.array_equal(np.asarray(rgb)[..., 0], expected) and np.asarray(rgb)[0, :4, 0].tolist() == [0, 0, 1, 255]
    pixels = values.size
    # The 8-bit copy plus one band (its bytes, its 32-bit integers); a float64 copy alone would be 8 bytes a pixel.
    assert peak < pixels + 8 * transforms.SIXTEEN_BIT_BAND_PIXELS, peak
    assert peak < 8 * pixels
