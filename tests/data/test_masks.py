"""Loss masks (data/masks.py, cache/masks.py): the same crop as the latent, mirrored with flips, averaged onto the
latent grid, cached content-addressed; missing or wrong-size masks are skipped and listed, never trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertune.cache.latents import LatentCache
from expertune.cache.masks import MaskCache
from expertune.data.dataloader import load_dataloader_config
from expertune.data.masks import mask_to_latent_grid, masked_mean, read_mask
from expertune.data.records import discover_records
from expertune.data.transforms import mirror_plan, plan_crop
from expertune.errors import ConfigError, DataError


def _half_mask(size: tuple[int, int]) -> Image.Image:
    """White on the left half (w x h `size`), black on the right."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[:, : size[0] // 2] = 255
    return Image.fromarray(pixels, "L")


def test_the_mask_follows_the_crop_onto_the_latent_grid() -> None:
    plan = plan_crop((64, 64), (64, 64), "center", seed=0, image_key="a")
    grid = mask_to_latent_grid(_half_mask((64, 64)), plan)
    assert grid.shape == (1, 8, 8)
    assert torch.equal(grid[0, :, :4], torch.ones(8, 4)) and torch.equal(grid[0, :, 4:], torch.zeros(8, 4))
    assert torch.equal(mask_to_latent_grid(_half_mask((64, 64)), mirror_plan(plan), flip=True), grid.flip(-1))
    # a wide image cropped to a square: the crop's left edge is 16 px into the resized image
    wide = plan_crop((64, 96), (64, 64), "center", seed=0, image_key="b")
    assert wide.crop_top_left == (0, 16)
    grid = mask_to_latent_grid(_half_mask((96, 64)), wide)  # white up to x = 48, i.e. 32 px into the crop
    assert torch.equal(grid[0, :, :4], torch.ones(8, 4)) and torch.equal(grid[0, :, 4:], torch.zeros(8, 4))
    with pytest.raises(DataError, match="of the image's own size"):
        mask_to_latent_grid(_half_mask((32, 32)), plan)


def test_alpha_masks_and_grey_masks_are_read(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(read_mask(tmp_path / "a.png", alpha=True)).max() == 128
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "b.png")
    assert np.asarray(read_mask(tmp_path / "b.png", alpha=True)).min() == 255  # no alpha: nothing masked
    assert read_mask(tmp_path / "b.png").mode == "L"


def test_masked_mean_is_the_mean_of_the_weighted_elements() -> None:
    loss = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    masks = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    out = masked_mean(loss, masks)
    assert out[1].item() == pytest.approx(loss[1].mean().item())
    assert out[0].item() == pytest.approx((loss[0] * masks[0]).sum().item() / 16)


def _mask_dataset(root: Path) -> Path:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            images / f"img_{index}.png")
        (images / f"img_{index}.txt").write_text(f"image {index}")
    _half_mask((64, 64)).save(masks / "img_0.png")
    _half_mask((32, 32)).save(masks / "img_1.jpg")  # another size: skipped
    # img_2 has no mask: skipped
    config = root / "dataloader.json"
    config.write_text(json.dumps([
        {"id": "pics", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 64, "cache_dir_vae": str(root / "cache" / "vae"), "conditioning_data": "pics-masks"},
        {"id": "pics-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(masks)},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(root / "cache" / "text")},
    ]))
    return config


def test_the_mask_cache_keeps_good_masks_and_reports_the_rest(tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL

    config = load_dataloader_config(_mask_dataset(tmp_path), default_resolution=64, default_cache_dir=tmp_path)
    spec = config.datasets[0]
    assert spec.mask_dir == tmp_path / "masks" and spec.has_masks
    vae = AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae")
    latents = LatentCache(vae, seed=0, batch_size=2)
    items = [(record, spec) for record in discover_records(spec).records]
    masks = MaskCache(latents)
    failed = masks.ensure(items)
    assert sorted(Path(p).name for p in failed) == ["img_1.png", "img_2.png"]
    assert "of the image's own size" in failed[str(items[1][0].path)] and "no mask" in failed[str(items[2][0].path)]
    assert masks.encoded == 1 and MaskCache(latents).ensure(items[:1]) == {}  # a second cache reuses the entry
    good = masks.load(*items[0])
    assert torch.equal(good, mask_to_latent_grid(_half_mask((64, 64)), latents.planned(*items[0]).plan))
    assert torch.equal(masks.load(*items[0], flipped=True), good.flip(-1))


@pytest.mark.parametrize("entries, words", [
    ([{"conditioning_data": "nope"}], "is not an enabled entry"),
    ([{"conditioning_data": "m"}, {"id": "m", "dataset_type": "conditioning", "conditioning_type": "depth"}],
     "'depth' is not supported"),
    ([{"alpha_mask": True, "conditioning_data": "m"}, {"id": "m", "dataset_type": "conditioning"}], "Use one"),
])
def test_bad_mask_datasets_are_refused(tmp_path: Path, entries: list[dict], words: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    first = {"id": "pics", "type": "local", "instance_data_dir": str(images), **entries[0]}
    rest = [{"type": "local", "instance_data_dir": str(images), **entry} for entry in entries[1:]]
    path = tmp_path / "dataloader.json"
    path.write_text(json.dumps([first, *rest]))
    with pytest.raises(ConfigError, match=words):
        load_dataloader_config(path, default_resolution=64, default_cache_dir=tmp_path)
