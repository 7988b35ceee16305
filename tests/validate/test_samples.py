"""Validation images of one expert, made by the Validator itself on the tiny model (untrained)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FakeAccelerator
from expertune.config import load_config
from expertune.experts import ExpertBand
from expertune.schedule import NoiseSchedule
from expertune.train.loop import noise_schedule_for
from expertune.validate.plan import build_plan
from expertune.validate.samples import Validator, first_timestep_below, validation_scheduler


def test_validation_scheduler_carries_the_trained_parameterisation(tiny_model_dir: Path) -> None:
    from diffusers import DDPMScheduler

    pretrained = dict(DDPMScheduler.load_config(str(tiny_model_dir), subfolder="scheduler"))
    assert (pretrained["prediction_type"], pretrained["timestep_spacing"]) == ("epsilon", "leading")
    trained = NoiseSchedule.from_scheduler_config(pretrained, prediction_type="v_prediction",
                                                  rescale_betas_zero_snr=True, inference_timestep_spacing="trailing")
    scheduler = validation_scheduler(pretrained["_class_name"], pretrained, trained)
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.config.timestep_spacing == "trailing"
    assert torch.allclose(scheduler.alphas_cumprod[:-1], trained.alphas_cumprod[:-1])
    # REFERENCE §1: trailing, 40 steps → the refiner's first t is 349; 30 steps → 332.
    assert int(first_timestep_below(scheduler, 40, ExpertBand(0, 349))[0]) == 349
    assert int(first_timestep_below(scheduler, 30, ExpertBand(0, 349))[0]) == 332
    assert int(first_timestep_below(scheduler, 30, ExpertBand(350, 999))[0]) == 999


@pytest.fixture(scope="module")
def validation_setup(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Loaded tiny components and the prepared small dataset, as `train` has them when it validates."""
    from expertune.models.sdxl import load_components
    from expertune.prepare import prepare_data

    inputs = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (80, 64), "orange").save(inputs / "sunset.png")
    (inputs / "sunset.txt").write_text("an orange field\n")
    flags = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={small_dataset}",
             "--resolution=64", "--validation_num_inference_steps=4", "--validation_guidance=5",
             "--validation_prompt=a red circle", "--validation_negative_prompt=blurry", "--report_to=none",
             "--prediction_type=v_prediction", "--rescale_betas_zero_snr", "--validation_using_datasets",
             f"--validation_input={inputs}"]
    config, _ = load_config(flags)
    components = load_components(str(tiny_model_dir))
    schedule = noise_schedule_for(config, components.scheduler_config)
    plan = build_plan(config, ExpertBand(0, 349), schedule, Path("unused"))
    prepared = prepare_data(config, components, extra_prompts=plan.prompts_to_cache)
    return config, components, schedule, prepared


def _validator(setup, band: ExpertBand, output_dir: Path, **validation) -> Validator:
    config, components, schedule, prepared = setup
    config = replace(config, validation=replace(config.validation, **validation))
    plan = build_plan(config, band, schedule, output_dir)
    return Validator(config, plan, components, schedule, band, prepared, FakeAccelerator(), output_dir)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_stage_1_text_to_image_honours_guidance_rescale(validation_setup, tmp_path: Path) -> None:
    unet = validation_setup[1].unet
    plain = _validator(validation_setup, ExpertBand(350, 999), tmp_path, validation_input=None)
    rescaled = _validator(validation_setup, ExpertBand(350, 999), tmp_path, validation_input=None,
                          validation_guidance_rescale=0.7)
    with torch.no_grad():
        a, again, b = (v.text_to_image(unet)[0] for v in (plain, plain, rescaled))
    assert a.name == "text_to_image_prompt" and a.image.size == (64, 64)
    assert np.array_equal(_pixels(a.image), _pixels(again.image))  # seeded: same settings, same image
    assert np.abs(_pixels(a.image) - _pixels(b.image)).mean() > 0.5  # the rescale reached the sampler


def test_stage_2_grids_from_datasets_and_explicit_inputs_honour_guidance_rescale(validation_setup,
                                                                                  tmp_path: Path) -> None:
    unet = validation_setup[1].unet
    plain = _validator(validation_setup, ExpertBand(0, 349), tmp_path)
    rescaled = _validator(validation_setup, ExpertBand(0, 349), tmp_path, validation_guidance_rescale=0.7)
    with torch.no_grad():
        a, again, b = (v.partial_denoise_images(unet) for v in (plain, plain, rescaled))
    assert [i.name for i in a] == ["partial_denoise_00", "partial_denoise_01", "partial_denoise_input_sunset"]
    assert all(i.image.size == (3 * 64, 64) for i in a)  # input | noised | output
    assert a[2].prompt == "an orange field"  # the input's caption file
    for x, same, y in zip(a, again, b):
        assert np.array_equal(_pixels(x.image), _pixels(same.image))  # seeded: same settings, same grid
        assert np.array_equal(_pixels(x.image)[:, :128], _pixels(y.image)[:, :128])  # same input and noise
        # A different rescale, a different output (the random tiny VAE decodes small latent changes faintly).
        assert not np.array_equal(_pixels(x.output), _pixels(y.output))
    # The run writes them under validation/step_NNNNNN and records its numbers (none configured here).
    written = plain.run(unet, 7)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        f"validation/step_000007/{i.name}.png" for i in a]


def test_stage_2_without_images_warns_and_makes_none(validation_setup, tmp_path: Path, caplog) -> None:
    validator = _validator(validation_setup, ExpertBand(0, 349), tmp_path, validation_input=None,
                           validation_using_datasets=False)
    assert "has none to validate on" in caplog.text
    assert validator.run(validation_setup[1].unet, 1) == []
