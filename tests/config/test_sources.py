"""load_config: TOML, config.env and flags -> merged, validated Config (and warnings)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from expertune.config import Config, load_config
from expertune.config.envfile import parse_env_text
from expertune.config.validate import UNSUPPORTED
from expertune.demo.recipe import RECIPE_STAGE_2_CHANGES, recipe_env
from expertune.errors import ConfigError, UnsupportedFeatureError

# The recipe's blocks with the seed's own values (stage two appended to stage one, as the recipe says).
STAGE_ONE = recipe_env(1, "models/ssd-1b", "/data/stage1", "config/multidatabackend.json")
STAGE_TWO = RECIPE_STAGE_2_CHANGES.format(output="/some/new/path")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_env(tmp_path: Path, text: str, *argv: str, environ=None) -> tuple[Config, list[str]]:
    return load_config(["--env", str(write(tmp_path, "config.env", text)), *argv], environ=environ or {})


# ---- the recipe -------------------------------------------------------------------------------

def test_recipe_stage_one(tmp_path):
    config, warnings = load_env(tmp_path, STAGE_ONE)
    assert warnings == []
    flat = config.flat()
    expected = {
        "layer_freeze_strategy": "none", "use_dora": False, "model_type": "full", "model_family": "sdxl",
        "pretrained_model_name_or_path": "models/ssd-1b", "learning_rate": 4e-7, "train_batch_size": 8,
        "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "refiner_training": True,
        "refiner_training_strength": 0.35, "refiner_training_invert_schedule": True,
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
        "training_scheduler_timestep_spacing": "trailing", "output_dir": "/data/stage1",
        "data_backend_config": "config/multidatabackend.json", "validation_using_datasets": False,
        "timestep_range": None,
    }
    assert {k: flat[k] for k in expected} == expected
    changed = {k for k, v in flat.items() if v != Config().flat()[k]}
    assert changed == {k for k, v in expected.items() if v != Config().flat()[k]}
    config.require_for_training()


def test_recipe_stage_two(tmp_path):
    config, warnings = load_env(tmp_path, STAGE_ONE + STAGE_TWO)
    assert warnings == []
    flat = config.flat()
    assert flat["refiner_training"] is True
    assert flat["refiner_training_strength"] == 0.35
    assert flat["refiner_training_invert_schedule"] is False
    assert flat["validation_using_datasets"] is True
    assert flat["prediction_type"] == "v_prediction"
    assert flat["rescale_betas_zero_snr"] is True
    assert flat["training_scheduler_timestep_spacing"] == "trailing"
    assert flat["output_dir"] == "/some/new/path"
    assert flat["learning_rate"] == 4e-7 and flat["train_batch_size"] == 8


# ---- precedence -------------------------------------------------------------------------------

def test_precedence_defaults_toml_env_cli(tmp_path):
    toml = write(tmp_path, "c.toml", 'learning_rate = 1e-5\ntrain_batch_size = 2\nseed = 7\noutput_dir = "/t"\n')
    env = write(tmp_path, "c.env", "export LEARNING_RATE=2e-5\nexport TRAIN_BATCH_SIZE=3\n")
    config, _ = load_config(["--config", str(toml), f"--env={env}", "--learning_rate=3e-5"], environ={})
    assert config.train.learning_rate == 3e-5  # CLI > env > TOML
    assert config.train.train_batch_size == 3  # env > TOML
    assert config.train.seed == 7 and config.train.output_dir == "/t"  # TOML > defaults
    assert config.train.lr_scheduler == "constant"  # default
    config, _ = load_config(["--env", str(env), "--config", str(toml)], environ={})
    assert config.train.learning_rate == 2e-5  # order on the command line does not matter


def test_extra_args_override_env_variables_and_last_flag_wins(tmp_path):
    config, _ = load_env(tmp_path, 'LEARNING_RATE=1e-5\nTRAINER_EXTRA_ARGS="--learning_rate=2e-5"\n'
                                   "TRAIN_BATCH_SIZE=4\n", "--seed=1", "--seed", "2")
    assert config.train.learning_rate == 2e-5
    assert config.train.train_batch_size == 4
    assert config.train.seed == 2


def test_false_boolean_env_variable_adds_nothing(tmp_path):
    toml = write(tmp_path, "c.toml", "gradient_checkpointing = true\n")
    env = write(tmp_path, "c.env", "USE_GRADIENT_CHECKPOINTING=false\nUSE_EMA=false\nUSE_BITFIT=no\n")
    config, _ = load_config(["--config", str(toml), "--env", str(env)], environ={})
    assert config.train.gradient_checkpointing is True
    assert config.train.use_ema is False and config.model.layer_freeze_strategy == "none"


def test_load_config_does_not_require_training_settings():
    config, warnings = load_config([])
    assert config == Config() and warnings == []


# ---- config.env syntax ------------------------------------------------------------------------

def test_env_expansion_quotes_continuations_and_comments(tmp_path):
    text = textwrap.dedent("""\
        # a comment
           # an indented comment

        BASE=/data   # trailing comment
        export OUTPUT_DIR="${BASE}/out"
        export DATALOADER_CONFIG=$BASE/loader.json
        export VALIDATION_PROMPT='a $BASE ${BASE} "literal" \\n'
        export VALIDATION_NEGATIVE_PROMPT="blurry, \\"ugly\\", $UNSET_VAR_X end"
        export TRACKER_RUN_NAME=run#1
        export TRAINER_EXTRA_ARGS="--refiner_training \\
          --refiner_training_strength=0.3"
        export TRACKER_PROJECT_NAME=multi\\
        line
        export MODEL_NAME="$FROM_OS/model"; export LEARNING_RATE=5e-7
        export VALIDATION_RESOLUTION="${MISSING:-64}"
        """)
    config, warnings = load_env(tmp_path, text, environ={"FROM_OS": "/os"})
    assert config.train.output_dir == "/data/out"
    assert config.data.data_backend_config == "/data/loader.json"
    assert config.validation.validation_prompt == 'a $BASE ${BASE} "literal" \\n'
    assert config.validation.validation_negative_prompt == 'blurry, "ugly",  end'
    assert config.logging.tracker_run_name == "run#1"
    assert config.band.refiner_training and config.band.refiner_training_strength == 0.3
    assert config.logging.tracker_project_name == "multiline"
    assert config.model.pretrained_model_name_or_path == "/os/model"
    assert config.train.learning_rate == 5e-7
    assert config.validation.validation_resolution == "64"
    assert warnings == []  # BASE only feeds other variables' expansions: a helper, not an unknown variable


def test_env_falls_back_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTUNE_TEST_ROOT", "/from/environ")
    path = write(tmp_path, "c.env", 'OUTPUT_DIR="$EXPERTUNE_TEST_ROOT/x"\n')
    config, _ = load_config(["--env", str(path)])
    assert config.train.output_dir == "/from/environ/x"


def test_file_variables_shadow_os_environ():
    got = parse_env_text('HOME=/mine\nA="$HOME/a"\nB=~/b\n', environ={"HOME": "/theirs"})
    assert [(a.name, a.value, a.line) for a in got] == [("HOME", "/mine", 1), ("A", "/mine/a", 2),
                                                       ("B", "/mine/b", 3)]


@pytest.mark.parametrize("text,line,what", [
    ('A=1\nB="unterminated\n\n', 2, "unterminated double quote"),
    ("A=1\n\nB='open\n", 3, "unterminated single quote"),
    ("A=1\nsource other.env\n", 2, "expected 'VAR=value'"),
    ("A=1\nB=$(whoami)\n", 2, "command substitution"),
    ("A=1\nB=`whoami`\n", 2, "not supported"),
    ("A=1\nB=x | tee\n", 2, "commands are not supported"),
    ("A=1 echo hi\n", 1, "commands are not supported"),
    ("export A=1 )\n", 1, "expected a variable name"),
    ("A=1\nB=${C/x/y}\n", 2, "bad substitution"),
    ("export 1A=2\n", 1, "variable name"),
])
def test_env_syntax_errors_name_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, "bad.env", text)
    with pytest.raises(ConfigError) as info:
        load_config(["--env", str(path)], environ={})
    assert f"{path}:{line}:" in str(info.value)
    assert what in str(info.value)
    assert info.value.exit_code == 2


SHELL_CASES = textwrap.dedent("""\
    export A=plain
    B="${A} and $A"   # comment
    C='single $A ${A} \\ "x"'
    D="esc \\$A \\" \\\\ \\x tail"
    E=unq\\ uoted\\$A
    F="multi \\
    line"
    G=con\\
    tinued
    H="$A"'$A'$A
    I=${NOPE:-dflt} J=${A:-dflt} K=${EMPTY:-e} L=${EMPTY-e}
    export M=1 N=2; O="a#b" P=x#y
    Q=~/q R=a~b
    S="${A}${A}" T=$A.x U=$
    export A
    V="${A:-"q w"}" W=${NOPE:-'$A x'} X="a
    b" Y=\\\\back Z=a\\\\
    """)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to compare with")
@pytest.mark.integration  # it starts bash
def test_env_parser_agrees_with_bash(tmp_path):
    path = write(tmp_path, "shell.env", "EMPTY=\n" + SHELL_CASES)
    names = sorted({a.name for a in parse_env_text(path.read_text(), environ={})})
    script = f'source "{path}"; ' + " ".join(f'printf "%s\\0" "${n}";' for n in names)
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, check=True,
                         env={"HOME": "/home/u", "PATH": "/usr/bin:/bin"}).stdout.decode()
    bash_values = dict(zip(names, out.split("\0")))
    ours = {a.name: a.value for a in parse_env_text(path.read_text(), environ={"HOME": "/home/u"})}
    assert ours == bash_values


# ---- unknown names ----------------------------------------------------------------------------

def test_unknown_toml_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "c.toml", "learning_rat = 1e-5\n")
    with pytest.raises(ConfigError, match=r"'learning_rat' in .*c\.toml; did you mean 'learning_rate'"):
        load_config(["--config", str(path)])


def test_toml_tables_are_rejected(tmp_path):
    path = write(tmp_path, "c.toml", "[train]\nlearning_rate = 1e-5\n")
    with pytest.raises(ConfigError, match=r"'train' in .*c\.toml.*flat"):
        load_config(["--config", str(path)])


def test_unknown_cli_flag_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown option --refiner_trainin \(from command line\); "
                                          r"did you mean 'refiner_training'"):
        load_config(["--refiner_trainin"])
    with pytest.raises(ConfigError, match="unknown option --zzz_qqq"):
        load_config(["--zzz_qqq=1"])


def test_unknown_flag_in_trainer_extra_args_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_env(tmp_path, 'A_B=1\nexport TRAINER_EXTRA_ARGS="--refiner_training --snr_gama=5"\n')
    message = str(info.value)
    assert "--snr_gama" in message and "config.env:2" in message and "TRAINER_EXTRA_ARGS" in message


def test_unknown_env_variable_is_a_warning_naming_it_and_the_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="expertune.config"):
        config, warnings = load_env(tmp_path, "export LEARNING_RATE=1e-5\nexport LEARNING_RAT=2\n"
                                              "export DISABLE_UPDATES=true\n")
    assert config.train.learning_rate == 1e-5
    assert len(warnings) == 2
    assert "LEARNING_RAT " in warnings[0] and "config.env:2" in warnings[0] and "LEARNING_RATE" in warnings[0]
    assert "DISABLE_UPDATES" in warnings[1] and "config.env:3" in warnings[1]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("expertune.config")] == warnings


def test_recognised_options_without_a_field_in_toml(tmp_path):
    toml = write(tmp_path, "c.toml", 'validation_method = "simpletuner-local"\nvalidate_after_step = false\n')
    config, warnings = load_config(["--config", str(toml)])
    assert config == Config()
    assert len(warnings) == 1 and "'validation_method'" in warnings[0] and "c.toml" in warnings[0]


def test_recognised_options_without_a_field_warn_unless_off(tmp_path):
    config, warnings = load_env(tmp_path, "VALIDATION_METHOD=simpletuner-local\nVALIDATE_AFTER_STEP=\n"
                                          "VALIDATE_AFTER_EPOCH=false\n", "--validation_epoch_interval=2")
    assert len(warnings) == 2
    assert "VALIDATION_METHOD" in warnings[0] and "ignored: expertune validates every" in warnings[0]
    assert "--validation_epoch_interval" in warnings[1] and "command line" in warnings[1]
    assert config == Config()


# ---- values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["--use_ema=false"], False), (["--refiner_training"], True), (["--refiner_training=true"], True),
    (["--refiner_training=1"], True), (["--refiner_training=yes"], True), (["--refiner_training=no"], False),
    (["--refiner_training=0"], False), (["--refiner_training=FALSE"], False), (["--refiner_training", "false"], False),
])
def test_booleans(argv, expected):
    config, _ = load_config(argv)
    assert config.flat()[argv[0][2:].split("=")[0]] is expected


def test_value_forms_and_conversions(tmp_path):
    config, _ = load_config(["--resolution", "512", "--learning_rate=1e-4", "--max_train_steps=0",
                             "--optimizer=adamw_torch", "--validation_prompt", "a cat", "--prediction_type="])
    assert config.data.resolution == 512 and config.train.learning_rate == 1e-4
    assert config.train.max_train_steps is None  # SimpleTuner's 0 = use epochs
    assert config.train.optimizer == "adamw"
    assert config.validation.validation_prompt == "a cat" and config.schedule.prediction_type is None
    config, _ = load_env(tmp_path, "MAX_NUM_STEPS=0\nNUM_EPOCHS=3\n")
    assert config.train.max_train_steps is None and config.train.num_train_epochs == 3
    toml = write(tmp_path, "c.toml", 'learning_rate = 1\nresolution = "768"\nrescale_betas_zero_snr = true\n')
    config, _ = load_config(["--config", str(toml)])
    assert config.train.learning_rate == 1.0 and config.data.resolution == 768
    assert config.schedule.rescale_betas_zero_snr is True


@pytest.mark.parametrize("argv,needles", [
    (["--mixed_precision=bf61"], ["mixed_precision", "'bf61'", "no, bf16, fp16", "did you mean 'bf16'"]),
    (["--prediction_type=v-prediction"], ["prediction_type", "'v-prediction'", "v_prediction"]),
    (["--model_family=sd15"], ["model_family", "'sd15'", "one of: sdxl"]),
    (["--resolution=big"], ["resolution", "'big'", "number > 0"]),
    (["--resolution=4"], ["resolution=4", "command line", "whole number of pixels >= 8"]),
    (["--resolution=1000.5"], ["resolution=1000.5", "whole number of pixels"]),
    (["--resolution_type=area"], ["resolution=1024", "defaults", "megapixels", "pixel_area"]),
    (["--train_batch_size=1.5"], ["train_batch_size", "'1.5'", "integer"]),
    (["--learning_rate=0"], ["learning_rate", "'0'", "number > 0"]),
    (["--learning_rate=nan"], ["learning_rate", "'nan'"]),
    (["--refiner_training_strength=1"], ["refiner_training_strength", "'1'", "(0, 1)"]),
    (["--refiner_training_strength=0"], ["refiner_training_strength", "'0'", "(0, 1)"]),
    (["--caption_dropout_probability=1.5"], ["caption_dropout_probability", "[0, 1]"]),
    (["--validation_guidance_rescale=-0.1"], ["validation_guidance_rescale", "[0, 1]"]),
    (["--refiner_training=maybe"], ["refiner_training", "'maybe'", "true or false"]),
    (["--timestep_range=999,0"], ["timestep_range", "999,0", "LO <= HI"]),
    (["--timestep_range=abc"], ["timestep_range", "'LO,HI'"]),
    (["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps", "'0'", ">= 1"]),
    (["--num_processes=0"], ["num_processes", "'0'"]),
])
def test_bad_values_name_field_value_source_and_allowed(argv, needles):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert type(info.value) is ConfigError
    for needle in needles + ["command line"]:
        assert needle in str(info.value), (needle, str(info.value))


def test_bad_values_from_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train_batch_size: 'eight' \(from .*config\.env:1 \(TRAIN_BATCH_SIZE\)"):
        load_env(tmp_path, "TRAIN_BATCH_SIZE=eight\n")
    with pytest.raises(ConfigError, match=r"USE_EMA: 'sure'.*config\.env:1"):
        load_env(tmp_path, "USE_EMA=sure\n")
    toml = write(tmp_path, "c.toml", "train_batch_size = 2.5\n")
    with pytest.raises(ConfigError, match=r"train_batch_size: 2\.5 \(from TOML file .*c\.toml\)"):
        load_config(["--config", str(toml)])
    toml = write(tmp_path, "c.toml", "resolution = true\n")
    with pytest.raises(ConfigError, match="resolution: true"):
        load_config(["--config", str(toml)])
    toml = write(tmp_path, "c.toml", "resolution = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(toml)])


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate"], "needs a value"),
    (["--learning_rate", "--seed=1"], "needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config"], "needs a value"),
    (["--config=a.toml", "--config=b.toml"], "given twice"),
    (["--config=/nonexistent/x.toml"], "cannot read config file"),
    (["--env=/nonexistent/x.env"], "cannot read config.env file"),
])
def test_command_line_shape_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_file_options_are_not_allowed_inside_trainer_extra_args(tmp_path):
    with pytest.raises(ConfigError, match="--config is only accepted on the command line"):
        load_env(tmp_path, 'TRAINER_EXTRA_ARGS="--config=x.toml"\n')


# ---- unsupported features ---------------------------------------------------------------------

# One triggering value per row of the UNSUPPORTED table.
UNSUPPORTED_CASES = {
    "layer_freeze_strategy": "--layer_freeze_strategy=bitfit",
    "optimizer": "--optimizer=lion",
    "text_cache_ondemand": "--text_cache_ondemand", "text_cache_disable": "--text_cache_disable",
}


def test_every_unsupported_row_is_tested():
    assert set(UNSUPPORTED_CASES) == {row.name for row in UNSUPPORTED}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_CASES))
def test_unsupported_features(name):
    with pytest.raises(UnsupportedFeatureError) as info:
        load_config([UNSUPPORTED_CASES[name]])
    assert name in str(info.value) and "not supported" in str(info.value) and "command line" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("value", ["optimi-adamw", "sgd", "lion"])
def test_unsupported_optimizers_point_to_the_supported_ones(value):
    with pytest.raises(UnsupportedFeatureError, match="supported optimizers are adamw, adamw_bf16"):
        load_config([f"--optimizer={value}"])


@pytest.mark.parametrize("value, name", [("adamw_8bit", "adamw8bit"), ("bnb-adamw8bit", "adamw8bit"),
                                         ("adafactor", "adafactor"), ("prodigy", "prodigy")])
def test_optimizer_names_and_aliases(value, name):
    assert load_config([f"--optimizer={value}"])[0].train.optimizer == name


def test_lora_settings():
    config = load_config(["--model_type=lora", "--lora_rank=8", "--lora_target_modules=to_q,to_v"])[0]
    assert (config.model.model_type, config.model.lora_rank, config.model.lora_alpha) == ("lora", 8, None)
    assert config.model.lora_target_modules == "to_q,to_v"


@pytest.mark.parametrize("line", ["USE_BITFIT=true",
                                  'OPTIMIZER="lion"', "STABLE_DIFFUSION_3=true", "CONTROLNET=true"])
def test_unsupported_features_from_config_env(tmp_path, line):
    with pytest.raises(UnsupportedFeatureError) as info:
        load_env(tmp_path, f"export {line}\n")
    assert line.split("=")[0] in str(info.value) and "config.env:1" in str(info.value)


def test_default_or_explicitly_off_values_are_fine(tmp_path):
    config, warnings = load_env(tmp_path, "USE_DORA=false\nUSE_EMA=false\nTRAINING_NUM_PROCESSES=1\n"
                                          "TRAINING_NUM_MACHINES=1\nBASE_MODEL_PRECISION=no_change\n"
                                          'RESUME_CHECKPOINT=""\nACCELERATE_EXTRA_ARGS=""\nLORA_TYPE=standard\n'
                                          "OPTIMIZER=adamw_torch\nMODEL_TYPE=full\nRESOLUTION_TYPE=pixel\n")
    assert config == Config() and warnings == []


def test_several_unsupported_features_are_reported_together():
    with pytest.raises(UnsupportedFeatureError) as info:
        load_config(["--text_cache_ondemand", "--layer_freeze_strategy=bitfit"])
    assert "text_cache_ondemand" in str(info.value) and "layer_freeze_strategy" in str(info.value)


# ---- cross-field checks -----------------------------------------------------------------------

def test_invert_schedule_needs_refiner_training():
    with pytest.raises(ConfigError, match="refiner_training_invert_schedule .*needs refiner_training"):
        load_config(["--refiner_training_invert_schedule"])
    config, _ = load_config(["--refiner_training", "--refiner_training_invert_schedule"])
    assert config.band.refiner_training_invert_schedule


def test_timestep_range_excludes_refiner_training():
    with pytest.raises(ConfigError, match="timestep_range='0,349'.*refiner_training.*use one"):
        load_config(["--timestep_range=0,349", "--refiner_training"])
    config, _ = load_config(["--timestep_range=0,349"])
    assert config.timestep_bounds == (0, 349)


def test_resolution_is_read_in_the_unit_of_resolution_type():
    config, _ = load_config(["--resolution_type=area", "--resolution=1.0", "--minimum_image_size=0.25"])
    assert (config.data.resolution, config.data.resolution_type, config.data.minimum_image_size) == (1.0, "area", 0.25)
    config, _ = load_config(["--resolution_type=pixel_area", "--resolution=768", "--aspect_bucket_rounding=2"])
    assert config.data.resolution == 768 and config.data.aspect_bucket_rounding == 2


def test_held_out_images_are_chosen_one_way():
    with pytest.raises(ConfigError, match="eval_dataset_id='faces'.*eval_holdout_fraction=0.1.*use one"):
        load_config(["--eval_dataset_id=faces", "--eval_holdout_fraction=0.1"])
    config, _ = load_config(["--eval_holdout_fraction=0.25", "--evaluation_type=clip"])
    assert config.validation.eval_holdout_fraction == 0.25 and config.validation.evaluation_type == "clip"
    with pytest.raises(ConfigError, match="eval_holdout_fraction"):
        load_config(["--eval_holdout_fraction=1"])
