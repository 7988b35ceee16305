"""SimpleTuner's config.json / config.toml as written: coercion, aliases, the flag table, refusals, detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertune.config import Config, load_config
from expertune.config.config_files import find_default_config
from expertune.config.schema import FIELDS, parse_validation_resolutions
from expertune.config.simpletuner_flags import FAMILIES, OPTIONS, lookup
from expertune.config.sources import draw_seed
from expertune.errors import ConfigError, UnsupportedFeatureError


def _json(folder: Path, data: dict, name: str = "config.json") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_config_json_values_are_coerced_as_simpletuner_does(tmp_path: Path) -> None:
    path = _json(tmp_path, {
        "--learning_rate": "1e-4", "--max_train_steps": "500", "--gradient_checkpointing": "true",
        "--use_ema": False, "train_batch_size": 2, "--validation_guidance_rescale": "0.0",
        "--num_train_epochs": 0, "--validation_prompt": "'a cat'", "--tracker_run_name": None,
        "--validation_seed": "", "--validation_resolution": 1024, "--seed": 7})
    config, warnings = load_config(["--config", str(path)])
    t = config.train
    assert (t.learning_rate, t.max_train_steps, t.gradient_checkpointing, t.use_ema) == (1e-4, 500, True, False)
    assert (t.train_batch_size, t.num_train_epochs, t.seed) == (2, None, 7)
    assert config.validation.validation_prompt == "a cat"  # one pair of quotes stripped, as SimpleTuner does
    assert config.validation.validation_resolution == "1024" and config.validation.validation_seed is None
    assert config.logging.tracker_run_name is None and warnings == []


def test_aliases_set_the_expertune_option_from_every_source(tmp_path: Path) -> None:
    path = _json(tmp_path, {"--checkpointing_steps": "250", "--validation_steps": 100,
                            "--user_prompt_library": "prompts.json", "ema_cpu_only": "true",
                            "--adam_bfloat16": "false"})
    config, _ = load_config(["--config", str(path)])
    assert config.train.checkpoint_step_interval == 250 and config.validation.validation_step_interval == 100
    assert config.validation.validation_prompt_library == "prompts.json"
    assert config.train.ema_device == "cpu" and config.train.optimizer == "adamw"
    flags, _ = load_config(["--checkpointing_steps", "30", "--validation_steps=20", "--use_8bit_adam"])
    assert (flags.train.checkpoint_step_interval, flags.validation.validation_step_interval) == (30, 20)
    assert flags.train.optimizer == "adamw8bit"
    toml = tmp_path / "c.toml"
    toml.write_text('checkpointing_steps = 40\n"--validation_steps" = "10"\n', encoding="utf-8")
    from_toml, _ = load_config(["--config", str(toml)])
    assert (from_toml.train.checkpoint_step_interval, from_toml.validation.validation_step_interval) == (40, 10)


def test_the_recipes_checkpoint_steps_and_extra_args_spellings_in_config_env(tmp_path: Path) -> None:
    env = tmp_path / "config.env"
    env.write_text('export CHECKPOINT_STEPS=150\nexport TRAINING_SEED=-1\nexport TRAINER_EXTRA_ARGS="'
                   '--validation_steps=50 --validation_resolution=1024x1024,1152x896 --noise_offset=0.05 '
                   '--offset_noise --push_to_hub --hub_model_id=me/x --validation_torch_compile=true"\n',
                   encoding="utf-8")
    config, warnings = load_config(["--env", str(env)])
    assert config.train.checkpoint_step_interval == 150 and config.validation.validation_step_interval == 50
    assert config.train.seed == -1 and config.train.offset_noise and config.train.noise_offset == 0.05
    assert parse_validation_resolutions(config.validation.validation_resolution or "") == [(1024, 1024), (1152, 896)]
    # SimpleTuner's hub flags are expertune options of the same names (the hub section), not ignored rows.
    assert config.hub.push_to_hub and config.hub.hub_model_id == "me/x"
    assert not [w for w in warnings if "push_to_hub" in w or "hub_model_id" in w]


def test_ignored_options_say_why_and_stay_silent_when_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _json(tmp_path, {"--validation_torch_compile": "false", "--disable_benchmark": "false",
                            "--model_card_note": "mine", "--flux_guidance_value": "3.5", "--crepa_lambda": 0.5,
                            "--validation_prompt_library": "false"})
    with caplog.at_level("INFO", logger="expertune.config"):
        config, warnings = load_config(["--config", str(path)])
    assert config == Config()
    assert len(warnings) == 1 and "'--model_card_note' = mine" in warnings[0] and str(path) in warnings[0]
    assert "model cards" in warnings[0]
    assert "applies to Flux models" in caplog.text and "read only with crepa_enabled" in caplog.text
    assert "validation_torch_compile" not in caplog.text  # false: nothing to say


@pytest.mark.parametrize("key,value,words", [
    ("--use_soft_min_snr", "true", "snr_gamma"),
    ("--lora_init_type", "loftq", "peft"),
    ("--train_text_encoder", "true", "UNet only"),
    ("--crepa_enabled", "true", "CREPA"),
    ("--trust_remote_code", True, "never runs"),
])
def test_refused_options_name_the_file_key_and_value(tmp_path: Path, key: str, value: object, words: str) -> None:
    path = _json(tmp_path, {key: value})
    with pytest.raises(UnsupportedFeatureError) as info:
        load_config(["--config", str(path)])
    message = str(info.value)
    assert str(path) in message and repr(key) in message and words in message


def test_simpletuner_knobs_of_issue_23_are_options(tmp_path: Path) -> None:
    path = _json(tmp_path, {"--loss_type": "huber", "--huber_schedule": "exponential", "--huber_c": "0.2",
                            "timestep_bias_strategy": "later", "timestep_bias_multiplier": "2.0"})
    config, _ = load_config(["--config", str(path)])
    assert (config.train.loss_type, config.train.huber_schedule, config.train.huber_c) == ("huber", "exponential", 0.2)
    assert (config.band.timestep_bias_strategy, config.band.timestep_bias_multiplier) == ("later", 2.0)
    assert config.to_dict()["train"]["loss_type"] == "huber"  # what run.json records


def test_refused_options_pass_when_they_ask_for_nothing(tmp_path: Path) -> None:
    path = _json(tmp_path, {"--loss_type": "l2", "--timestep_bias_strategy": "none", "--input_perturbation": 0.0,
                            "--train_text_encoder": "false", "--lora_type": "standard"})
    config, warnings = load_config(["--config", str(path)])
    assert config == Config() and warnings == []


def test_unknown_keys_and_bad_values_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key '--checkpointing_step' in .*config\.json; did you mean"):
        load_config(["--config", str(_json(tmp_path, {"--checkpointing_step": 5}))])
    with pytest.raises(ConfigError, match=r"invalid value for max_train_steps: 'many' \(from SimpleTuner JSON file"):
        load_config(["--config", str(_json(tmp_path, {"--max_train_steps": "many"}))])
    with pytest.raises(ConfigError, match=r"checkpoint_step_interval: 'often' .*config\.json, as key '--checkpointing_steps'"):
        load_config(["--config", str(_json(tmp_path, {"--checkpointing_steps": "often"}))])
    with pytest.raises(ConfigError, match=r"must hold one JSON object"):
        load_config(["--config", str(_json(tmp_path, [1, 2]))])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'--x'.*nested values are not supported"):
        load_config(["--config", str(_json(tmp_path, {"--x": {"a": 1}}))])
    with pytest.raises(ConfigError, match=r"1024y1024"):
        load_config(["--validation_resolution=1024y1024"])
    with pytest.raises(ConfigError, match=r"multiples of 8"):
        load_config(["--validation_resolution=1020x1024"])


def test_config_shapes_are_told_apart_by_extension_then_content(tmp_path: Path) -> None:
    no_suffix = tmp_path / "settings"
    no_suffix.write_text('{"--checkpointing_steps": "9"}', encoding="utf-8")
    assert load_config(["--config", str(no_suffix)])[0].train.checkpoint_step_interval == 9
    env = tmp_path / "config.env"
    env.write_text("export CHECKPOINTING_STEPS=8\n", encoding="utf-8")
    assert load_config(["--config", str(env)])[0].train.checkpoint_step_interval == 8
    toml = tmp_path / "config.toml"
    toml.write_text('"--checkpointing_steps" = "7"\ngradient_checkpointing = "true"\n', encoding="utf-8")
    config = load_config(["--config", str(toml)])[0]
    assert config.train.checkpoint_step_interval == 7 and config.train.gradient_checkpointing


def test_the_config_simpletuner_would_find(tmp_path: Path) -> None:
    assert find_default_config({}, tmp_path) is None
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.env").write_text("A=1\n")
    assert find_default_config({}, tmp_path) == tmp_path / "config" / "config.env"
    _json(tmp_path / "config", {"--seed": 3})
    assert find_default_config({}, tmp_path) == tmp_path / "config" / "config.json"  # json first
    assert find_default_config({"CONFIG_BACKEND": "env"}, tmp_path) == tmp_path / "config" / "config.env"
    with pytest.raises(ConfigError, match="CONFIG_BACKEND=toml but .*config.toml does not exist"):
        find_default_config({"CONFIG_BACKEND": "toml"}, tmp_path)
    stage = _json(tmp_path / "config" / "stage2", {"--seed": 4})
    assert find_default_config({"ENV": "stage2"}, tmp_path) == stage
    assert find_default_config({"ENV": "/etc/shrc"}, tmp_path) == tmp_path / "config" / "config.json"
    assert find_default_config({"CONFIG_PATH": str(stage.parent)}, tmp_path) == stage


def test_train_reads_the_found_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _json(tmp_path / "config", {"--checkpointing_steps": "12"})
    monkeypatch.chdir(tmp_path)
    assert load_config([], find_config=True)[0].train.checkpoint_step_interval == 12
    assert load_config([])[0].train.checkpoint_step_interval is None  # only train and cache look for it
    env = tmp_path / "other.env"
    env.write_text("export CHECKPOINTING_STEPS=5\n")
    assert load_config(["--env", str(env)], find_config=True)[0].train.checkpoint_step_interval == 5


def test_seed_minus_one_is_drawn_once_or_kept_from_the_checkpoint() -> None:
    config = Config.from_flat({"seed": -1})
    drawn = draw_seed(config)
    assert 0 <= drawn.train.seed < 2**31
    assert draw_seed(config, kept=1234).train.seed == 1234
    assert draw_seed(drawn) is drawn
    with pytest.raises(ConfigError, match="seed"):
        load_config(["--seed=-2"])


def test_noise_offset_without_its_switch_warns() -> None:
    _, warnings = load_config(["--noise_offset=0.1"])
    assert len(warnings) == 1 and "offset_noise" in warnings[0]
    config, warnings = load_config(["--offset_noise", "--noise_offset=0.1", "--noise_offset_probability=1"])
    assert warnings == [] and config.train.offset_noise and config.train.noise_offset_probability == 1.0


def test_the_flag_table_is_consistent() -> None:
    for row in OPTIONS.values():
        assert row.name not in FIELDS or row.name == "validation_prompt_library", row.name
        if row.action == "alias":
            assert row.target in FIELDS, row.name
        else:
            assert row.reason and "\n" not in row.reason and "|" not in row.reason, row.name
    assert all(f.reason for f in FAMILIES)
    assert lookup("flux_schedule_shift") is not None and lookup("no_such_option") is None


def test_an_older_snapshot_with_a_numeric_validation_resolution_migrates() -> None:
    from expertune.config.migrations import CONFIG_VERSION, migrate_snapshot

    snapshot = {"validation": {"validation_resolution": 64}, "train": {"seed": 1}}
    migrated = migrate_snapshot(snapshot, 1)
    assert CONFIG_VERSION == 2 and migrated["validation"]["validation_resolution"] == "64"
    assert snapshot["validation"]["validation_resolution"] == 64  # the stored one is left as it was


def test_config_env_appends_with_plus_equals_as_simpletuner_does(tmp_path: Path) -> None:
    env = tmp_path / "config.env"
    env.write_text('export TRAINER_EXTRA_ARGS="--seed=3"\nTRAINER_EXTRA_ARGS+="--validation_steps=5"\n'
                   'export TRAINER_EXTRA_ARGS+=" --checkpointing_steps=7"\nTRACKER_RUN_NAME+=run\n', encoding="utf-8")
    config, warnings = load_config(["--env", str(env)])
    assert (config.train.seed, config.validation.validation_step_interval) == (3, 5)
    assert config.train.checkpoint_step_interval == 7 and config.logging.tracker_run_name == "run"
    assert warnings == []
