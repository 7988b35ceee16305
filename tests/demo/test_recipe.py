"""Our copy of the recipe's config.env must match the seed the product is built from, line by line."""

from __future__ import annotations

from pathlib import Path

from expertune.demo.recipe import recipe_env

# The recipe's config.env blocks, verbatim from the seed except the MODEL_NAME value (filled in anyway), shipped
# with the tests (a clone has no ../shared/).
SEED = Path(__file__).resolve().parents[1] / "assets" / "recipe_config_env.txt"
FILLED_IN = ("export MODEL_NAME=", "export OUTPUT_DIR=", "export DATALOADER_CONFIG=")


def test_every_recipe_line_is_in_the_seed_word_for_word() -> None:
    seed_lines = set(SEED.read_text(encoding="utf-8").splitlines())
    for stage in (1, 2):
        text = recipe_env(stage, "models/ssd-1b", "/some/new/path", "x.json")
        for line in text.splitlines():
            if line.startswith(FILLED_IN):
                continue
            assert line in seed_lines, f"stage {stage} line not in the seed: {line!r}"
    # The two TRAINER_EXTRA_ARGS lines of each stage, and the stage-2 swap, are all there.
    stage2 = recipe_env(2, "m", "o", "d")
    assert stage2.count("export TRAINER_EXTRA_ARGS=") == 4
    assert stage2.rstrip().endswith("--training_scheduler_timestep_spacing=trailing\"")
