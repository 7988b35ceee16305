"""Shared fixtures: the tiny SDXL-layout model is built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL-layout `StableDiffusionXLPipeline` directory (seed 0). Treat as read-only."""
    from expertune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(autouse=True)
def _isolated_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's default cache directory out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# The recipe's stage-1 and stage-2 config.env blocks (../shared/seed/mixture-of-experts.txt), word for word
# except MODEL_NAME, OUTPUT_DIR and DATALOADER_CONFIG, which point at local test paths.
RECIPE_STAGE_1 = """\
# Ensure these aren't incorrectly set.
export USE_BITFIT=false
export USE_DORA=false
# lora could be used here instead, but the concept hasn't been explored.
export MODEL_TYPE="full"
export MODEL_FAMILY="sdxl"
export MODEL_NAME="{model}"
export OUTPUT_DIR="{output}"
export DATALOADER_CONFIG="{dataloader}"
# The original Segmind model used a learning rate of 1e-5, which is
# probably too high for whatever batch size most users can pull off.
export LEARNING_RATE=4e-7
# We really want this as high as you can tolerate.
# - If training is very slow, ensure your CHECKPOINT_STEPS and VALIDATION_STEPS
# are set low enough that you'll get a checkpoint every couple hours.
# - The original Segmind models used a batch size of 32 with 4 accumulations.
export TRAIN_BATCH_SIZE=8
export GRADIENT_ACCUMULATION_STEPS=1
# If you are running on a beefy machine that doesn't fully utilise its VRAM during training, set this to "false" and your training will go faster.
export USE_GRADIENT_CHECKPOINTING=true
# Enable first stage model training
export TRAINER_EXTRA_ARGS="--refiner_training --refiner_training_strength=0.35 --refiner_training_invert_schedule"
# Optionally reparameterise it to v-prediction/zero-terminal SNR. 'sample' prediction_type can be used instead for x-prediction.
# This will start out looking pretty terrible until about 1500-2500 steps have passed, but it could be very worthwhile.
export TRAINER_EXTRA_ARGS="${{TRAINER_EXTRA_ARGS}} --prediction_type=v_prediction --rescale_betas_zero_snr --training_scheduler_timestep_spacing=trailing"
"""

RECIPE_STAGE_2_CHANGES = """\
# Update your OUTPUT_DIR value, so that we don't overwrite the stage one model checkpoints.
export OUTPUT_DIR="{output}"
# We'll swap --refiner_training_invert_schedule for --validation_using_datasets
# - Train the end of the model instead of the beginning
# - Validate using images as input for partial denoising to evaluate fine detail improvements
export TRAINER_EXTRA_ARGS="--refiner_training --refiner_training_strength=0.35 --validation_using_datasets"
# Don't update these values if you've set them on the stage one. Be sure to use the same parameterisation for both models!
export TRAINER_EXTRA_ARGS="${{TRAINER_EXTRA_ARGS}} --prediction_type=v_prediction --rescale_betas_zero_snr --training_scheduler_timestep_spacing=trailing"
"""

# Small, fast settings layered on top as flags, the way a user overrides a config.env.
FAST_FLAGS = [
    "--max_train_steps=3",
    "--resolution=64",
    "--learning_rate=1e-4",
    "--validation_num_inference_steps=4",
    "--validation_prompt=a red circle, for validation",
]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned 96-px images in a local dataset, and a dataloader JSON with its own cache dirs."""
    from expertune.demo.dataset import SHAPES, _save, _shape, write_dataloader_config

    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    for index, (shape, colour, background) in enumerate(SHAPES[:6]):
        _save(_shape(shape, colour, background, size=96), images / f"shape_{index}.png",
              f"a {colour} {shape} on a {background} background")
    return write_dataloader_config(root / "dataloader.json", images, root / "cache", resolution=64)


def write_stage_env(folder: Path, stage: int, model: Path, output: Path, dataloader: Path) -> Path:
    text = RECIPE_STAGE_1.format(model=model, output=output, dataloader=dataloader)
    if stage == 2:
        text += RECIPE_STAGE_2_CHANGES.format(output=output)
    path = folder / f"stage{stage}.env"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_experts(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage 1 then stage 2 trained from the recipe's own config.env (3 steps each), sharing caches."""
    from expertune.config import load_config
    from expertune.train.loop import train

    root = tmp_path_factory.mktemp("experts")
    results = []
    for stage in (1, 2):
        env = write_stage_env(root, stage, tiny_model_dir, root / f"stage{stage}", small_dataset)
        config, _ = load_config(["--env", str(env), *FAST_FLAGS])
        results.append(train(config))
    return results[0], results[1]
