"""flip_images: mirrored crop coordinates, the mirrored latent as its own cache entry, and the per-epoch coin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expertune.cache.latents import LatentCache
from expertune.data.dataloader import DatasetSpec
from expertune.data.records import discover_records
from expertune.data.transforms import flip_chosen, image_to_tensor, load_image, mirror_plan, plan_crop


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae").eval()


def test_the_flipped_crop_coordinates_are_mirrored() -> None:
    plan = plan_crop((40, 90), (32, 32), "random", seed=1, image_key="a")  # resized to 32 x 72: 40 px to cut
    top, left = plan.crop_top_left
    mirrored = mirror_plan(plan)
    assert mirrored.crop_top_left == (top, 72 - left - 32)
    assert mirrored.time_ids() == (40, 90, top, 72 - left - 32, 32, 32)
    assert mirror_plan(mirrored) == plan
    corner = plan_crop((40, 90), (32, 32), "corner", seed=0, image_key="a")
    assert mirror_plan(corner).crop_top_left == (0, 40)  # the left-most crop of the mirror is its right-most


def test_the_flipped_crop_is_the_mirror_image_of_the_crop(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    plan = plan_crop((40, 90), (32, 32), "random", seed=5, image_key="a")
    assert torch.equal(image_to_tensor(image, mirror_plan(plan), flip=True), image_to_tensor(image, plan).flip(-1))


def test_the_flipped_latent_is_its_own_entry_and_the_vae_encoding_of_the_flipped_crop(tmp_path: Path, vae) -> None:
    images = tmp_path / "set"
    images.mkdir()
    for index, size in enumerate([(48, 40), (32, 64), (50, 33)]):
        pixels = np.random.default_rng(index).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"img_{index}.png")
    spec = DatasetSpec("set", images, "filename", None, 32, "random", tmp_path / "cache", 0, False)
    items = [(record, spec) for record in discover_records(spec).records]
    plain = LatentCache(vae, seed=3, batch_size=2)
    cache = LatentCache(vae, seed=3, batch_size=2, flip=True)
    assert cache.ensure(items).encoded == 6  # each image twice
    assert plain.ensure(items).encoded == 0  # the unflipped entries are the ones a run without flips uses
    for record, _ in items:
        planned = cache.planned(record, spec)
        flipped = cache.flipped(planned)
        assert flipped.key != planned.key and flipped.key == cache.flipped(plain.planned(record, spec)).key
        latent, time_ids = cache.load(record, spec, flipped=True)
        pixels = image_to_tensor(load_image(record.path), planned.plan).flip(-1)
        with torch.no_grad():
            expected = cache.encode_pixels(pixels[None])[0].float()
        assert torch.allclose(latent, expected, atol=1e-5)
        unflipped, plain_ids = cache.load(record, spec)
        assert not torch.allclose(unflipped, latent)
        top, left = planned.plan.crop_top_left
        width = planned.plan.resized_size[1] - left - planned.plan.target_size[1]
        assert time_ids.tolist() == [*planned.plan.original_size, top, width, *planned.plan.target_size]
        assert plain_ids.tolist() == list(planned.plan.time_ids())
    assert not plain.flips_at(0, 0) and not any(plain.flips_at(1, i) for i in range(50))


def test_the_coin_is_fair_and_changes_with_the_epoch() -> None:
    draws = [flip_chosen(42, 0, index) for index in range(10_000)]
    assert abs(sum(draws) - 5_000) < 4 * 50  # binomial(10^4, 1/2): sd 50, 4 sd
    again = [flip_chosen(42, 1, index) for index in range(10_000)]
    assert 4_800 < sum(a != b for a, b in zip(draws, again)) < 5_200  # independent across epochs
    assert draws == [flip_chosen(42, 0, index) for index in range(10_000)]  # and repeatable
