"""Validation of a refiner-layout expert: partial denoising of dataset images through diffusers' refiner pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import FakeAccelerator
from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.train.setup import noise_schedule_for
from expertune.validate.plan import build_plan
from expertune.validate.samples import Validator, first_timestep_below


@pytest.fixture(scope="module")
def refiner_setup(tiny_refiner_dir: Path, small_dataset: Path):
    from expertune.prepare import prepare_data
    from expertune.models.sdxl import load_components

    flags = [f"--pretrained_model_name_or_path={tiny_refiner_dir}", f"--data_backend_config={small_dataset}",
             "--resolution=64", "--validation_num_inference_steps=6", "--validation_guidance=4",
             "--report_to=none", "--validation_using_datasets", "--data_aesthetic_score=6.5"]
    config, _ = load_config(flags)
    components = load_components(str(tiny_refiner_dir))
    schedule = noise_schedule_for(config, components.scheduler_config)
    prepared = prepare_data(config, components)
    return config, components, schedule, prepared


def _validator(setup, band: ExpertBand, output_dir: Path, **validation) -> Validator:
    config, components, schedule, prepared = setup
    config = replace(config, validation=replace(config.validation, **validation))
    plan = build_plan(config, band, schedule, output_dir)
    return Validator(config, plan, components, schedule, band, prepared, FakeAccelerator(), output_dir)


def test_the_run_reads_the_refiner_caches(refiner_setup) -> None:
    _, components, _, prepared = refiner_setup
    item = prepared.items[0]
    latent, time_ids = prepared.latent_cache.load(item.record, item.spec)
    assert time_ids.shape == (5,) and float(time_ids[4]) == 6.5  # data_aesthetic_score as the fifth time id
    embeds, pooled = prepared.embed_cache.load(item.captions[0])
    assert embeds.shape == (77, components.text_encoder_2.config.hidden_size)
    # What a training step feeds the UNet: bigG-only embeddings and the five time ids, and the loss runs on them.
    from expertune.data.batches import MicroBatch
    from expertune.experts import ExpertBand
    from expertune.train.loop import load_batch
    from expertune.objective.loss import denoising_loss, draw_randomness

    batch = load_batch(prepared, MicroBatch(epoch=0, position=0, indices=(0, 1), global_size=2))
    assert batch.prompt_embeds.shape[-1] == 32 and batch.time_ids.shape == (2, 5)
    assert batch.time_ids[:, 4].tolist() == [6.5, 6.5]
    draws = draw_randomness(ExpertBand(0, 349), torch.Generator().manual_seed(0), 2, tuple(batch.latents.shape[1:]))
    with torch.no_grad():
        loss = denoising_loss(components.unet, batch, refiner_setup[2], draws).loss
    assert torch.isfinite(loss) and float(loss) > 0


def test_partial_denoising_is_diffusers_refiner_pipeline_from_the_noised_image(refiner_setup, tiny_refiner_dir: Path,
                                                                                tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    config, components, schedule, prepared = refiner_setup
    band = ExpertBand(0, 349)
    validator = _validator(refiner_setup, band, tmp_path)
    with torch.no_grad():
        images = validator.partial_denoise_images(components.unet)
    assert [i.name for i in images] == ["partial_denoise_00", "partial_denoise_01"]
    assert all(i.image.size == (3 * 64, 64) for i in images)

    # The same image by hand: the dataset latent noised to the band's first inference timestep, then diffusers'
    # refiner pipeline (its own text encoder 2 encodes the caption) from the hand-off, with the default scores.
    item = validator._dataset_items()[0]
    x0 = prepared.latent_cache.load(item.record, item.spec)[0].unsqueeze(0)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_dir), use_safetensors=True)
    pipe.scheduler = validator.scheduler()
    start = first_timestep_below(pipe.scheduler, 6, band)
    generator = torch.Generator().manual_seed(validator.settings.seed)
    noise = torch.randn(x0.shape, generator=generator)
    noised = pipe.scheduler.add_noise(x0, noise, start)
    expected = pipe(item.captions[0], image=noised, num_inference_steps=6, denoising_start=band.denoising_start,
                    guidance_scale=4.0, generator=generator, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                    output_type="np").images[0]
    made = np.asarray(images[0].output)
    assert np.abs(made.astype(np.float32) - (expected * 255).round()).max() <= 1  # same sample (VAE decode aside)

    other = _validator(refiner_setup, band, tmp_path, validation_aesthetic_score=1.0)
    with torch.no_grad():
        changed = other.partial_denoise_images(components.unet)[0].output
    assert not np.array_equal(np.asarray(changed), made)  # the score reached the refiner's time ids


def test_a_refiner_holding_the_first_timestep_or_with_a_base_peer_is_refused(refiner_setup, tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    import shutil

    from expertune.expert_format import ExpertDescription

    with pytest.raises(ConfigError, match=r"refiner layout .* band \[0, 999\] holds the first timestep 999"):
        _validator(refiner_setup, ExpertBand(0, 999), tmp_path)
    assert _validator(refiner_setup, ExpertBand(0, 999), tmp_path, validation_disable=True) is not None
    peer = tmp_path / "base-peer"
    shutil.copytree(tiny_model_dir, peer)
    ExpertDescription(ExpertBand(350, 999), refiner_setup[2].describe()).write(peer)
    with pytest.raises(ConfigError, match="base-peer has the SDXL base layout and this run's model the refiner "
                                          "layout.*expertune generate"):
        _validator(refiner_setup, ExpertBand(0, 349), tmp_path, validation_peer_expert=str(peer))
    other_refiner = tmp_path / "refiner-peer"
    shutil.copytree(refiner_setup[1].source, other_refiner)
    ExpertDescription(ExpertBand(350, 999), refiner_setup[2].describe()).write(other_refiner)
    with pytest.raises(ConfigError, match="both have the SDXL refiner layout: one of two chained experts starts "
                                          "from pure noise"):
        _validator(refiner_setup, ExpertBand(0, 349), tmp_path, validation_peer_expert=str(other_refiner))
