"""`expertune init`: starter configs that the config readers read back and validate, sized from the layouts,
never written over an existing file (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertune.cli import main
from expertune.config import load_config
from expertune.config.config_files import find_default_config
from expertune.data.dataloader import load_dataloader_config
from expertune.errors import ConfigError
from expertune.init import MODELS, size_for, write_starter
from expertune.validate.plan import load_prompt_library


@pytest.mark.parametrize("model,layout,fmt", [("ssd-1b", "two-stage", "json"), ("sdxl", "mixture", "toml"),
                                              ("ssd-1b", "mixture", "json"), ("sdxl", "two-stage", "toml")])
def test_what_init_writes_is_read_back_and_validates(tmp_path: Path, model: str, layout: str, fmt: str) -> None:
    folder = tmp_path / "config"
    (tmp_path / "images").mkdir()  # where the user puts their images
    written = write_starter(folder, model, layout, 80, fmt, data=tmp_path / "images", output=tmp_path / "out")
    settings = [p for p in written if p.suffix == f".{fmt}" and p.stem not in ("multidatabackend", "user_prompt_library")]
    assert len(settings) == (2 if layout == "two-stage" else 1)
    for path in settings:
        config, warnings = load_config(["--config", str(path)])
        config.require_for_training()
        assert warnings == []
        assert config.model.mixed_precision == "bf16" and config.validation.validation_on_startup
        assert config.train.checkpoint_step_interval == 500 and config.validation.validation_step_interval == 250
        assert config.validation.eval_holdout_fraction == 0.02
        assert config.model.pretrained_model_name_or_path in MODELS.values()  # the model the user chose
        assert load_prompt_library(config.validation.validation_prompt_library or "")
        loader = load_dataloader_config(config.data.data_backend_config or "", default_resolution=1024,
                                        default_cache_dir=tmp_path / "cache")
        assert loader is not None
    if layout == "two-stage":
        stage1, stage2 = (load_config(["--config", str(p)])[0] for p in settings)
        assert stage1.band.refiner_training_invert_schedule and not stage2.band.refiner_training_invert_schedule
        assert stage2.validation.validation_using_datasets
    else:
        assert load_config(["--config", str(settings[0])])[0].mixture.mixture_boundaries == "350"
    if fmt == "toml":
        assert all(p.read_text().startswith("# ") for p in settings)  # commented
        assert "checkpoint_step_interval = 500" in settings[0].read_text()  # expertune's names in its TOML
    else:
        assert "## Sizing" in (folder / "README.md").read_text()


def test_json_stages_are_found_with_env_as_simpletuner_does(tmp_path: Path) -> None:
    write_starter(tmp_path / "config", "ssd-1b", "two-stage", 24)
    assert find_default_config({"ENV": "stage2"}, tmp_path) == tmp_path / "config" / "stage2" / "config.json"


def test_init_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "user_prompt_library.json").write_text('{"mine": "keep me"}')
    assert main(["init", str(folder), "--gpu_memory", "48"]) == 2
    err = capsys.readouterr().err
    assert "user_prompt_library.json already exists" in err and err.startswith("expertune: error:")
    assert json.loads((folder / "user_prompt_library.json").read_text()) == {"mine": "keep me"}
    assert sorted(p.name for p in folder.iterdir()) == ["user_prompt_library.json"]  # nothing else written
    assert main(["init", str(tmp_path / "other"), "--model", "sdxl", "--gpu_memory", "80", "--format", "toml"]) == 0
    assert "wrote " in capsys.readouterr().out and (tmp_path / "other" / "stage1.toml").is_file()


def test_sizing_follows_memory() -> None:
    big = size_for("ssd-1b", 80)
    assert (big.optimizer, big.gradient_checkpointing, big.train_batch_size) == ("adamw", False, 8)
    small = size_for("ssd-1b", 24)
    assert small.gradient_checkpointing and small.optimizer != "adamw"
    assert small.estimate_gib <= small.budget_gib
    assert small.train_batch_size * small.gradient_accumulation_steps == 8
    with pytest.raises(ConfigError, match=r"--gpu_memory 12: sdxl .*needs about \d+ GiB"):
        size_for("sdxl", 12)


@pytest.mark.integration
def test_a_config_init_wrote_trains(tmp_path: Path, tiny_model_dir: Path, small_dataset: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """init's stage-1 config.json as written, found with ENV=stage1, trains and exports: only what no starter can
    know is given (the local model instead of the hub id, the tiny world's 64 px, one step, no validation)."""
    import json

    from expertune.cli import main
    from expertune.expert_format import ExpertDescription

    monkeypatch.chdir(tmp_path)
    assert main(["init", "--data", str(small_dataset.parent / "images")]) == 0
    dataloader = tmp_path / "config" / "multidatabackend.json"
    datasets = json.loads(dataloader.read_text())
    datasets[0].update(resolution=64, minimum_image_size=0)  # the tiny world's images are 96 px
    dataloader.write_text(json.dumps(datasets))
    monkeypatch.setenv("ENV", "stage1")
    code = main(["train", f"--pretrained_model_name_or_path={tiny_model_dir}", "--resolution=64",
                 "--max_train_steps=1", "--train_batch_size=1", "--validation_disable"])
    assert code == 0
    expert = ExpertDescription.read(tmp_path / "output" / "stage1" / "pipeline")
    assert (expert.band.lo, expert.band.hi) == (350, 999) and expert.parameterisation["prediction_type"] == "v_prediction"
