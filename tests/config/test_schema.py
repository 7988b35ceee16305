"""The typed schema: field registry, Config views, helpers and the generated reference docs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from expertune.config import FIELDS, Config, config_from_mapping, default_cache_dir, parse_timestep_range
from expertune.config.reference import render_markdown_reference
from expertune.config.schema import DEFAULT_EVALUATION_MODEL, IGNORED_OPTIONS, SECTIONS
from expertune.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# The variable table of shared/reference/simpletuner-env.md (variable -> flag), copied verbatim.
SIMPLETUNER_ENV_TABLE = """
RESUME_CHECKPOINT resume_from_checkpoint
DATALOADER_CONFIG data_backend_config
ASPECT_BUCKET_ROUNDING aspect_bucket_rounding
TRAINING_SEED seed
ACCELERATE_CONFIG_PATH accelerate_config
ACCELERATE_EXTRA_ARGS accelerate_extra_args
USE_EMA use_ema
MINIMUM_RESOLUTION minimum_image_size
OUTPUT_DIR output_dir
USE_DORA use_dora
USE_BITFIT layer_freeze_strategy=bitfit
LORA_TYPE lora_type
MAX_NUM_STEPS max_train_steps
NUM_EPOCHS num_train_epochs
CHECKPOINTING_STEPS checkpoint_step_interval
CHECKPOINT_STEP_INTERVAL checkpoint_step_interval
CHECKPOINT_EPOCH_INTERVAL checkpoint_epoch_interval
CHECKPOINTING_LIMIT checkpoints_total_limit
TRACKER_PROJECT_NAME tracker_project_name
TRACKER_RUN_NAME tracker_run_name
MODEL_TYPE model_type
MODEL_NAME pretrained_model_name_or_path
MODEL_FAMILY model_family
TRAIN_BATCH_SIZE train_batch_size
USE_GRADIENT_CHECKPOINTING gradient_checkpointing
CAPTION_DROPOUT_PROBABILITY caption_dropout_probability
RESOLUTION_TYPE resolution_type
RESOLUTION resolution
VALIDATION_SEED validation_seed
VALIDATION_STEPS validation_step_interval
VALIDATION_STEP_INTERVAL validation_step_interval
VALIDATION_EPOCH_INTERVAL validation_epoch_interval
VALIDATE_AFTER_STEP validate_after_step
VALIDATE_AFTER_EPOCH validate_after_epoch
VALIDATION_RESOLUTION validation_resolution
VALIDATION_GUIDANCE validation_guidance
VALIDATION_METHOD validation_method
SDXL_VALIDATION_PIPELINE_MODE sdxl_validation_pipeline_mode
VALIDATION_GUIDANCE_RESCALE validation_guidance_rescale
VALIDATION_NUM_INFERENCE_STEPS validation_num_inference_steps
VALIDATION_PROMPT validation_prompt
VALIDATION_INPUT validation_input
MIXED_PRECISION mixed_precision
OPTIMIZER optimizer
LEARNING_RATE learning_rate
LR_SCHEDULE lr_scheduler
LR_WARMUP_STEPS lr_warmup_steps
BASE_MODEL_PRECISION base_model_precision
TRAINING_NUM_PROCESSES num_processes
TRAINING_NUM_MACHINES num_machines
TRAINING_SCHEDULER_TIMESTEP_SPACING training_scheduler_timestep_spacing
INFERENCE_SCHEDULER_TIMESTEP_SPACING inference_scheduler_timestep_spacing
GRADIENT_ACCUMULATION_STEPS gradient_accumulation_steps
LR_END lr_end
VALIDATION_NEGATIVE_PROMPT validation_negative_prompt
READ_BATCH_SIZE read_batch_size
WRITE_BATCH_SIZE write_batch_size
TEXT_ENCODER_BATCH_SIZE text_encoder_batch_size
TEXT_CACHE_ONDEMAND text_cache_ondemand
TEXT_CACHE_DISABLE text_cache_disable
"""

# name: (section, type, optional, default) as specified for this module.
EXPECTED = {
    "pretrained_model_name_or_path": ("model", str, True, None), "model_family": ("model", str, False, "sdxl"),
    "model_type": ("model", str, False, "full"), "use_dora": ("model", bool, False, False),
    "lora_rank": ("model", int, False, 16), "lora_alpha": ("model", float, True, None),
    "lora_dropout": ("model", float, False, 0.0),
    "lora_target_modules": ("model", str, False, "to_k,to_q,to_v,to_out.0"),
    "layer_freeze_strategy": ("model", str, False, "none"), "lora_type": ("model", str, False, "standard"),
    "base_model_precision": ("model", str, False, "no_change"), "mixed_precision": ("model", str, False, "no"),
    "revision": ("model", str, True, None), "variant": ("model", str, True, None),
    "pure_bf16": ("model", bool, False, False), "allow_tf32": ("model", bool, False, False),
    "dynamo_backend": ("model", str, False, "no"),
    "data_backend_config": ("data", str, True, None), "resolution": ("data", float, False, 1024),
    "resolution_type": ("data", str, False, "pixel"), "minimum_image_size": ("data", float, True, None),
    "aspect_bucket_rounding": ("data", int, True, None),
    "caption_dropout_probability": ("data", float, False, 0.0), "vae_batch_size": ("data", int, False, 4),
    "text_encoder_batch_size": ("data", int, False, 8), "read_batch_size": ("data", int, True, None),
    "write_batch_size": ("data", int, True, None), "text_cache_ondemand": ("data", bool, False, False),
    "text_cache_disable": ("data", bool, False, False), "cache_dir": ("data", str, True, None),
    "refiner_training": ("band", bool, False, False), "refiner_training_strength": ("band", float, False, 0.2),
    "refiner_training_invert_schedule": ("band", bool, False, False),
    "timestep_range": ("band", str, True, None), "timestep_sampling": ("band", str, False, "uniform"),
    "mixture_boundaries": ("mixture", str, True, None), "mixture_schedule": ("mixture", str, False, "alternate"),
    "mixture_switch_every": ("mixture", int, False, 1), "mixture_offload_inactive": ("mixture", bool, False, False),
    "expert_models": ("mixture", str, True, None), "expert_learning_rates": ("mixture", str, True, None),
    "expert_loss_weightings": ("mixture", str, True, None), "expert_ema_decays": ("mixture", str, True, None),
    "mixture_shared_steps": ("mixture", str, True, None), "mixture_overlap": ("mixture", str, True, None),  # issue 22
    "mixture_handoff_blend": ("mixture", int, False, 0),
    "prediction_type": ("schedule", str, True, None), "rescale_betas_zero_snr": ("schedule", bool, False, False),
    "training_scheduler_timestep_spacing": ("schedule", str, False, "trailing"),
    "inference_scheduler_timestep_spacing": ("schedule", str, False, "trailing"),
    "output_dir": ("train", str, True, None), "overwrite_output_dir": ("train", bool, False, False),
    "seed": ("train", int, False, 42),  # -1: drawn at the start (SimpleTuner's "random")
    "learning_rate": ("train", float, False, 1e-6), "lr_scheduler": ("train", str, False, "constant"),
    "lr_warmup_steps": ("train", int, False, 0), "lr_end": ("train", float, False, 4e-7),
    "lr_num_cycles": ("train", int, False, 1), "lr_power": ("train", float, False, 1.0),
    "snr_gamma": ("train", float, True, None), "loss_weighting": ("train", str, True, None),
    "train_batch_size": ("train", int, False, 1), "gradient_accumulation_steps": ("train", int, False, 1),
    "gradient_checkpointing": ("train", bool, False, False), "max_train_steps": ("train", int, True, None),
    "num_train_epochs": ("train", int, True, None), "max_grad_norm": ("train", float, False, 1.0),
    "optimizer": ("train", str, False, "adamw"), "adam_beta1": ("train", float, False, 0.9),
    "adam_beta2": ("train", float, False, 0.999), "adam_weight_decay": ("train", float, False, 1e-2),
    "adam_epsilon": ("train", float, False, 1e-8), "use_ema": ("train", bool, False, False),
    "ema_decay": ("train", float, False, 0.9999), "ema_update_interval": ("train", int, False, 1),
    "ema_device": ("train", str, False, "accelerator"), "export_ema": ("train", bool, False, False),
    "allow_config_change": ("train", bool, False, False),
    "resume_from_checkpoint": ("train", str, True, None), "checkpoint_step_interval": ("train", int, True, None),
    "checkpoint_epoch_interval": ("train", int, True, None), "checkpoints_total_limit": ("train", int, True, None),
    "num_processes": ("train", int, False, 1), "num_machines": ("train", int, False, 1),
    "accelerate_config": ("train", str, True, None), "accelerate_extra_args": ("train", str, True, None),
    "offset_noise": ("train", bool, False, False), "noise_offset": ("train", float, False, 0.1),
    "noise_offset_probability": ("train", float, False, 0.25),
    # issue 19 (export)
    "export_format": ("train", str, False, "diffusers"), "export_precision": ("train", str, False, "fp32"),
    "export_on_interrupt": ("train", bool, False, True), "single_file_config": ("model", str, True, None),
    "max_nonfinite_steps": ("train", int, False, 5),  # issue 20 (helper ckpt)
    "validation_disable": ("validation", bool, False, False),
    "validation_prompt": ("validation", str, True, None), "validation_negative_prompt": ("validation", str, False, ""),
    "validation_step_interval": ("validation", int, True, None),
    "validation_num_inference_steps": ("validation", int, False, 20),
    "validation_guidance": ("validation", float, False, 7.5),
    "validation_guidance_rescale": ("validation", float, False, 0.0),
    "validation_resolution": ("validation", str, True, None), "validation_seed": ("validation", int, True, None),
    "validation_using_datasets": ("validation", bool, False, False),
    "validation_input": ("validation", str, True, None),
    "validation_prompt_library": ("validation", str, True, None),
    "validation_on_startup": ("validation", bool, False, False),
    "validation_peer_expert": ("validation", str, True, None),
    "evaluation_type": ("validation", str, False, "none"),
    "pretrained_evaluation_model_name_or_path": ("validation", str, False, DEFAULT_EVALUATION_MODEL),
    "eval_dataset_id": ("validation", str, True, None),
    "eval_holdout_fraction": ("validation", float, True, None),
    # issue 25 (speed)
    "timing_breakdown_interval": ("train", int, True, None), "peak_tflops": ("train", float, True, None),
    "prefetch_batches": ("train", bool, False, True), "eval_holdout_max_images": ("validation", int, False, 256),
    "eval_subbands": ("validation", int, False, 4),
    "eval_timesteps_per_subband": ("validation", int, False, 4),
    # The SDXL refiner layout (docs/refiner.md)
    "data_aesthetic_score": ("data", float, False, 7.0),
    "validation_aesthetic_score": ("validation", float, False, 6.0),
    "validation_negative_aesthetic_score": ("validation", float, False, 2.5),
    "report_to": ("logging", str, False, "tensorboard"), "tracker_project_name": ("logging", str, False, "expertune"),
    "tracker_run_name": ("logging", str, True, None), "logging_dir": ("logging", str, True, None),
    "push_to_hub": ("hub", bool, False, False), "hub_model_id": ("hub", str, True, None),
    "push_checkpoints_to_hub": ("hub", bool, False, False),
    # issue 23 (knobs)
    "timestep_distribution": ("band", str, False, "uniform"), "logit_mean": ("band", float, False, 0.0),
    "logit_std": ("band", float, False, 1.0), "timestep_bias_strategy": ("band", str, False, "none"),
    "timestep_bias_multiplier": ("band", float, False, 1.0), "timestep_bias_begin": ("band", int, False, 0),
    "timestep_bias_end": ("band", int, False, 1000), "timestep_bias_portion": ("band", float, False, 0.25),
    "loss_type": ("train", str, False, "l2"), "huber_schedule": ("train", str, False, "snr"),
    "huber_c": ("train", float, False, 0.1), "flip_images": ("data", bool, False, False),
    "lycoris_config": ("model", str, True, None), "optimizer_release_gradients": ("train", bool, False, False),
    "input_perturbation": ("train", float, False, 0.0), "input_perturbation_steps": ("train", int, False, 0),
    "masked_loss_probability": ("train", float, False, 1.0),
}


def test_field_registry_matches_the_specification():
    assert list(SECTIONS) == ["model", "data", "band", "mixture", "schedule", "train", "validation", "logging",
                              "hub"]
    assert set(FIELDS) == set(EXPECTED)
    for name, (section, typ, optional, default) in EXPECTED.items():
        spec = FIELDS[name]
        assert (spec.section, spec.type, spec.optional, spec.default) == (section, typ, optional, default), name
        assert spec.doc and spec.doc.endswith("."), name
        assert "\n" not in spec.doc and "|" not in spec.doc, name


def test_choices():
    assert FIELDS["model_family"].choices == ("sdxl",)
    assert FIELDS["model_type"].choices == ("full", "lora")
    assert FIELDS["mixed_precision"].choices == ("no", "bf16", "fp16")
    assert FIELDS["resolution_type"].choices == ("pixel", "area", "pixel_area")
    assert FIELDS["prediction_type"].choices == ("epsilon", "v_prediction", "sample")
    assert FIELDS["training_scheduler_timestep_spacing"].choices == ("leading", "linspace", "trailing")
    assert FIELDS["lr_scheduler"].choices == ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                              "linear", "polynomial", "sine")
    assert FIELDS["report_to"].choices == ("tensorboard", "wandb", "all", "none")
    assert FIELDS["loss_weighting"].choices == ("none", "min_snr", "debiased")
    assert FIELDS["timestep_sampling"].choices == ("uniform", "stratified")
    assert FIELDS["evaluation_type"].choices == ("none", "clip")


def test_every_simpletuner_env_variable_maps_to_its_flag():
    env_to_field = {env: spec for spec in FIELDS.values() for env in spec.env}
    rows = [line.split() for line in SIMPLETUNER_ENV_TABLE.strip().splitlines()]
    assert len(rows) == 60
    for var, flag in rows:
        name, _, value = flag.partition("=")
        if name in IGNORED_OPTIONS:
            assert IGNORED_OPTIONS[name] == var
            assert var not in env_to_field
            continue
        assert env_to_field[var].name == name, var
        if value:
            assert env_to_field[var].env_true_value == value
    declared = set(env_to_field) | set(IGNORED_OPTIONS.values())
    # Nothing made up either: the table's variables, plus those of the mid-2024 config.env.example template.
    template_only = {"VAE_BATCH_SIZE", "EMA_DECAY", "MIN_SNR_GAMMA", "ALLOW_TF32", "TRAINING_DYNAMO_BACKEND",
                     "PURE_BF16", "PUSH_TO_HUB", "HUB_MODEL_NAME", "PUSH_CHECKPOINTS",
                     "CHECKPOINT_STEPS"}  # the recipe's own name for the checkpoint interval (issue 19)
    assert declared == {var for var, _ in rows} | template_only


def test_flat_and_to_dict_views():
    config = Config()
    flat = config.flat()
    assert list(flat) == list(FIELDS)
    assert flat == {name: spec.default for name, spec in FIELDS.items()}
    nested = config.to_dict()
    assert set(nested) == set(SECTIONS)
    assert json.loads(json.dumps(nested)) == nested
    assert {k: v for section in nested.values() for k, v in section.items()} == flat


def test_from_flat_and_round_trip_through_run_json():
    config = Config.from_flat({"learning_rate": 4e-7, "refiner_training": True, "output_dir": "/o"})
    assert config.train.learning_rate == 4e-7 and config.band.refiner_training and config.train.output_dir == "/o"
    assert config_from_mapping(json.loads(json.dumps(config.to_dict()))) == config
    assert config_from_mapping(config.flat()) == config
    with pytest.raises(ConfigError, match="learning_rat"):
        Config.from_flat({"learning_rat": 1.0})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.learning_rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("text,expected", [("0,349", (0, 349)), (" 650 , 999 ", (650, 999)), ("5,5", (5, 5))])
def test_parse_timestep_range(text, expected):
    assert parse_timestep_range(text) == expected


@pytest.mark.parametrize("text", ["", "5", "1,2,3", "a,b", "10,5", "-1,5", "1.5,3"])
def test_parse_timestep_range_rejects(text):
    with pytest.raises(ConfigError, match="timestep_range"):
        parse_timestep_range(text)


def test_timestep_bounds_property():
    assert Config().timestep_bounds is None
    assert Config.from_flat({"timestep_range": "0,349"}).timestep_bounds == (0, 349)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "expertune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "expertune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "expertune"
    assert Config().resolved_cache_dir() == default_cache_dir()
    assert Config.from_flat({"cache_dir": "/c"}).resolved_cache_dir() == Path("/c")


def test_resolved_logging_dir():
    assert Config().resolved_logging_dir() is None
    assert Config.from_flat({"output_dir": "/o"}).resolved_logging_dir() == Path("/o/logs")
    assert Config.from_flat({"output_dir": "/o", "logging_dir": "/l"}).resolved_logging_dir() == Path("/l")


def test_require_for_training_names_missing_fields_and_how_to_set_them():
    with pytest.raises(ConfigError) as info:
        Config.from_flat({"output_dir": "/o"}).require_for_training()
    message = str(info.value)
    assert "pretrained_model_name_or_path" in message and "MODEL_NAME" in message
    assert "data_backend_config" in message and "DATALOADER_CONFIG" in message
    assert "--data_backend_config" in message
    assert "output_dir" not in message.replace("OUTPUT_DIR", "")
    assert info.value.exit_code == 2
    Config.from_flat({"output_dir": "/o", "pretrained_model_name_or_path": "m",
                      "data_backend_config": "d.json"}).require_for_training()


def test_allowed_text():
    assert FIELDS["refiner_training_strength"].allowed_text() == "number in (0, 1)"
    assert FIELDS["caption_dropout_probability"].allowed_text() == "number in [0, 1]"
    assert FIELDS["resolution"].allowed_text() == "number > 0"
    assert FIELDS["learning_rate"].allowed_text() == "number > 0"
    assert FIELDS["max_train_steps"].allowed_text() == "integer >= 1; 0 means unset"
    assert FIELDS["use_ema"].allowed_text() == "true or false"
    assert FIELDS["mixed_precision"].allowed_text() == "one of: no, bf16, fp16"


def test_docs_file_is_the_rendered_reference():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render_markdown_reference(), (
        "docs/configuration.md is stale: run `python -m expertune.config.reference > docs/configuration.md`")


def test_reference_mentions_every_option_env_variable_and_unsupported_row():
    from expertune.config.validate import UNSUPPORTED

    text = render_markdown_reference()
    for spec in FIELDS.values():
        assert f"| `{spec.name}` |" in text
        for env in spec.env:
            assert f"`{env}`" in text
    for flag, env in IGNORED_OPTIONS.items():
        assert f"| `{flag}` | `{env}` | " in text
    for row in UNSUPPORTED:
        assert row.message in text
    assert "TOML" in text and "TRAINER_EXTRA_ARGS" in text and "one epoch" in text


def test_the_option_lists_are_derived_from_the_field_definitions():
    from expertune.config.schema import REQUIRED_FOR_TRAINING, UNSUPPORTED

    assert REQUIRED_FOR_TRAINING == ("pretrained_model_name_or_path", "data_backend_config", "output_dir")
    assert all(FIELDS[name].required_for_training for name in REQUIRED_FOR_TRAINING)
    assert [row.name for row in UNSUPPORTED] == [n for n, spec in FIELDS.items() if spec.unsupported is not None]
    for row in UNSUPPORTED:
        assert FIELDS[row.name].unsupported is row and not row.applies(FIELDS[row.name].default)
    # One message shared by two options still names each of them.
    assert FIELDS["text_cache_disable"].unsupported.message == FIELDS["text_cache_ondemand"].unsupported.message
    assert {FIELDS[n].unsupported.name for n in ("text_cache_disable", "text_cache_ondemand")} == {
        "text_cache_disable", "text_cache_ondemand"}
