"""The recipe's config.env blocks (the user-facing mixture-of-experts recipe), as users bring them.

Word for word except MODEL_NAME, OUTPUT_DIR and DATALOADER_CONFIG, which are filled in. Stage 2 is stage 1's
file with the recipe's stage-2 lines appended, as the recipe says ("update the following values").
The demo trains from these files and the tests check them line by line against the seed.
"""

from __future__ import annotations

import os

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
# - If training is very slow, ensure your CHECKPOINTING_STEPS and VALIDATION_STEPS
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


def recipe_env(stage: int, model: str | os.PathLike, output: str | os.PathLike, dataloader: str | os.PathLike) -> str:
    """The text of the recipe's config.env for stage 1 or 2."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    text = RECIPE_STAGE_1.format(model=model, output=output, dataloader=dataloader)
    if stage == 2:
        text += RECIPE_STAGE_2_CHANGES.format(output=output)
    return text
