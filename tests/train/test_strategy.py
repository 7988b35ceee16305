"""Which engine a run uses, and the combinations the sharded engines refuse before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertune.cli import main
from expertune.config import load_config
from expertune.errors import ConfigError, UnsupportedFeatureError
from expertune.train.launch import engine_in_config_file
from expertune.train.strategy import check_engine_available, check_supported, engine_requested

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"


@pytest.mark.parametrize("flag, words", [
    ("--model_type=lora", "LoRA"),
    ("--use_ema", "EMA"),
    ("--optimizer=adamw8bit", "adamw8bit"),
])
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_refuse_what_they_cannot_shard(flag: str, words: str, engine: str) -> None:
    config, _ = load_config([flag])
    with pytest.raises(UnsupportedFeatureError, match=words):
        check_supported(config, engine)
    check_supported(config, "ddp")  # DDP takes all of them


def test_engine_comes_from_the_environment_accelerate_launch_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert engine_requested() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engine_requested() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "True")
    assert engine_requested() == "deepspeed"


def test_fsdp_needs_a_gpu_and_deepspeed_does_not() -> None:
    with pytest.raises(UnsupportedFeatureError, match="no GPU"):
        check_engine_available("fsdp", has_gpu=False)
    check_engine_available("fsdp", has_gpu=True)
    check_engine_available("deepspeed", has_gpu=False)  # installed for the tests; runs on gloo


def test_bad_accelerate_config_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        engine_in_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [DEEPSPEED\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        engine_in_config_file(broken)


def test_lora_with_a_deepspeed_config_is_refused_before_launch(tmp_path: Path, capsys) -> None:
    code = main(["train", "--model_type=lora", f"--output_dir={tmp_path / 'out'}", "--pretrained_model_name_or_path",
                 str(tmp_path), f"--accelerate_config={EXAMPLES / 'deepspeed_zero2.yaml'}", "--num_processes=2"])
    assert code == 2
    assert "DeepSpeed training does not support --model_type=lora" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_refuse_adamw_bf16(engine: str) -> None:
    config, _ = load_config(["--optimizer=adamw_bf16", "--mixed_precision=bf16"])
    with pytest.raises(UnsupportedFeatureError, match="adamw_bf16"):
        check_supported(config, engine)
    check_supported(config, "ddp")
