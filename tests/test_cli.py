from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expertune.cli import main


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "expertune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_bad_config_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    env = tmp_path / "config.env"
    env.write_text('export USE_DORA=true\nexport TRAINER_EXTRA_ARGS="--refiner_training_strength=1.5"\n')
    result = _run("train", "--env", str(env), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "refiner_training_strength" in result.stderr and "1.5" in result.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--learning_rat=1e-4"], "did you mean 'learning_rate'"),
        (["train", "--use_dora"], "DoRA"),
        (["train", "--lora_type=lycoris"], "lora_type=lycoris"),
        (["train", "--prediction_type=flow"], "prediction_type"),
        (["train"], "pretrained_model_name_or_path"),
    ],
)
def test_config_errors_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path: Path, small_dataset: Path, capsys) -> None:
    code = main(["train", f"--pretrained_model_name_or_path={tmp_path / 'nope'}",
                 f"--output_dir={tmp_path / 'out'}", f"--data_backend_config={small_dataset}"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_tiny_model_verb_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    assert main(["tiny-model", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "tiny"))
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_cache_verb_names_the_settings_it_needs(capsys: pytest.CaptureFixture) -> None:
    assert main(["cache", "--output_dir=unused"]) == 2
    err = capsys.readouterr().err
    assert "build the caches needs settings that are unset" in err
    assert "pretrained_model_name_or_path" in err and "data_backend_config" in err and "output_dir:" not in err


def test_tiny_clip_verb_writes_a_clip_that_loads_offline(tmp_path: Path) -> None:
    assert main(["tiny-clip", str(tmp_path / "clip")]) == 0
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(tmp_path / "clip"))
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "clip"))
    assert model.config.projection_dim == 16 and processor.tokenizer("a cat")["input_ids"]


def test_train_help_lists_every_option_by_section(capsys: pytest.CaptureFixture) -> None:
    from expertune.cli import main
    from expertune.config import FIELDS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for spec in FIELDS.values():
        assert f"  {spec.flag}  (default " in text, spec.name
    assert "--optimizer  (default 'adamw'" in text and "--prediction_type  (default unset; one of: epsilon" in text
    assert text.index("\nmodel: ") < text.index("\ntrain: ") < text.index("\nlogging: ")
