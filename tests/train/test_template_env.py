"""A config.env shaped like SimpleTuner's mid-2024 config/config.env.example runs as written.

The file below is ours: every variable that template sets (July-August 2024 versions), with its values
where they fit a tiny model, plus the recipe's TRAINER_EXTRA_ARGS. Nothing of it may draw an "unknown
variable" warning; the run trains with MIN_SNR_GAMMA, adamw_bf16 on bf16 weights, the sine schedule and
W&B (offline: no credentials here) and exports an expert.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expertune.config import load_config
from expertune.train.metrics import read_metrics
from expertune.train.optim import sine_lr

TEMPLATE_ENV = """\
export MODEL_TYPE='full'
export STABLE_DIFFUSION_3=false
export PIXART_SIGMA=false
export AURA_FLOW=false
export STABLE_DIFFUSION_LEGACY=false
export KOLORS=false
export FLUX=false
export FLUX_GUIDANCE_VALUE=1.0
export FLUX_LORA_TARGET=all
export HUNYUAN_DIT=false
export CONTROLNET=false
export USE_DORA=false
export USE_BITFIT=false
export RESUME_CHECKPOINT="latest"
export CHECKPOINTING_STEPS=2
export CHECKPOINTING_LIMIT=2
export LEARNING_RATE=8e-7 #@param {{type:"number"}}
export MODEL_NAME="{model}"
export DEBUG_EXTRA_ARGS="--report_to=wandb"
export TRACKER_PROJECT_NAME="${{MODEL_TYPE}}-training"
export TRACKER_RUN_NAME="simpletuner-sdxl"
export MAX_NUM_STEPS=3
export NUM_EPOCHS=0
export BASE_DIR="{base}"
export DATALOADER_CONFIG="${{BASE_DIR}}/multidatabackend.json"
export OUTPUT_DIR="${{BASE_DIR}}/models"
export PUSH_TO_HUB="false"
export PUSH_CHECKPOINTS="true"
export HUB_MODEL_NAME=$TRACKER_PROJECT_NAME
export MODEL_CARD_SAFE_FOR_WORK="false"
export RESOLUTION=64
export RESOLUTION_TYPE="pixel"
export MINIMUM_RESOLUTION=$RESOLUTION
export VALIDATION_PROMPT="a red circle, for validation"
export VALIDATION_GUIDANCE=7.5
export VALIDATION_GUIDANCE_RESCALE=0.0
export VALIDATION_GUIDANCE_REAL=1.0
export VALIDATION_NO_CFG_UNTIL_TIMESTEP=2
export VALIDATION_STEPS=100
export VALIDATION_NUM_INFERENCE_STEPS=4
export VALIDATION_NEGATIVE_PROMPT="blurry, cropped, ugly"
export VALIDATION_SEED=42
export VALIDATION_RESOLUTION=$RESOLUTION
export TRAIN_BATCH_SIZE=2
export GRADIENT_ACCUMULATION_STEPS=1
export LR_SCHEDULE="sine"
export LR_WARMUP_STEPS=4
export CAPTION_DROPOUT_PROBABILITY=0.1
export METADATA_UPDATE_INTERVAL=65
export VAE_BATCH_SIZE=3
export MAX_WORKERS=32
export READ_BATCH_SIZE=25
export WRITE_BATCH_SIZE=64
export IMAGE_PROCESSING_BATCH_SIZE=32
export AWS_MAX_POOL_CONNECTIONS=128
export TORCH_NUM_THREADS=8
export DELETE_ERRORED_IMAGES=0
export DELETE_SMALL_IMAGES=0
export TRAINING_SCHEDULER_TIMESTEP_SPACING="trailing"
export INFERENCE_SCHEDULER_TIMESTEP_SPACING="trailing"
export MIN_SNR_GAMMA=5
export USE_XFORMERS=true
export USE_GRADIENT_CHECKPOINTING=true
export ALLOW_TF32=true
export OPTIMIZER="adamw_bf16"
export USE_EMA=false
export EMA_DECAY=0.999
export TRAINER_EXTRA_ARGS=""
export TRAINER_EXTRA_ARGS="--refiner_training --refiner_training_strength=0.35 --refiner_training_invert_schedule"
export TRAINER_EXTRA_ARGS="${{TRAINER_EXTRA_ARGS}} --prediction_type=v_prediction --rescale_betas_zero_snr"
export TRAINING_SEED=42
export MIXED_PRECISION="bf16"                # a trailing comment
export PURE_BF16=true
export TRAINING_NUM_PROCESSES=1
export TRAINING_NUM_MACHINES=1
export ACCELERATE_EXTRA_ARGS=""
export TRAINING_DYNAMO_BACKEND='no'
export TOKENIZERS_PARALLELISM=false
"""


def write_template_env(folder: Path, model: Path, base: Path) -> Path:
    path = folder / "config.env"
    path.write_text(TEMPLATE_ENV.format(model=model, base=base), encoding="utf-8")
    return path


@pytest.fixture()
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # config.env sets it back to false
    return folder


def test_every_template_variable_is_known_and_maps(tmp_path: Path, offline_wandb: Path, caplog) -> None:
    env = write_template_env(tmp_path, Path("/models/sdxl"), tmp_path)
    with caplog.at_level(logging.INFO, logger="expertune.config"):
        config, warnings = load_config(["--env", str(env)])
    assert warnings == []  # nothing unknown, nothing ignored that the user counts on
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    t, m = config.train, config.model
    assert (t.lr_scheduler, t.lr_warmup_steps, t.optimizer, t.snr_gamma) == ("sine", 4, "adamw_bf16", 5.0)
    assert (m.mixed_precision, m.pure_bf16, m.allow_tf32, m.dynamo_backend) == ("bf16", True, True, "no")
    assert t.ema_decay == 0.999 and config.data.vae_batch_size == 3 and t.resume_from_checkpoint == "latest"
    assert config.logging.report_to == "wandb"  # DEBUG_EXTRA_ARGS
    assert config.logging.tracker_project_name == "full-training"
    assert (config.hub.push_to_hub, config.hub.hub_model_id) == (False, "full-training")  # HUB_MODEL_NAME
    assert t.output_dir == f"{tmp_path}/models" and config.data.data_backend_config.startswith(str(tmp_path))
    assert config.band.refiner_training_invert_schedule and config.schedule.prediction_type == "v_prediction"
    notes = "\n".join(r.getMessage() for r in caplog.records)
    assert "USE_XFORMERS=true ignored" in notes and "scaled_dot_product_attention" in notes
    assert "BASE_DIR" not in notes and "HUB_MODEL_NAME" not in notes  # a helper; hub settings while PUSH_TO_HUB=false


def test_debug_extra_args_come_before_trainer_extra_args(tmp_path: Path) -> None:
    env = tmp_path / "c.env"
    env.write_text('DEBUG_EXTRA_ARGS="--report_to=wandb --seed=1"\nTRAINER_EXTRA_ARGS="--seed=2"\n')
    config, _ = load_config(["--env", str(env)])
    assert config.logging.report_to == "wandb" and config.train.seed == 2


@pytest.mark.integration
def test_the_template_trains_to_an_exported_expert(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path,
                                                    offline_wandb: Path, caplog) -> None:
    from expertune.data.captioned import write_dataloader_config
    from expertune.train.loop import train

    base = tmp_path / "datasets"
    write_dataloader_config(base / "multidatabackend.json", small_dataset.parent / "images", base / "cache",
                            resolution=64)
    env = write_template_env(tmp_path, tiny_model_dir, base)
    config, warnings = load_config(["--env", str(env)])
    assert warnings == []
    with caplog.at_level(logging.INFO):
        result = train(config)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "no checkpoint" in messages and "starting a fresh run" in messages  # RESUME_CHECKPOINT=latest
    assert "starves the band [350, 999]" in messages and "999" in messages  # min-SNR on v under zero-terminal SNR
    assert "wandb sync" in messages  # offline W&B says how to upload

    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in records)  # finite (a t=999 sample weighs 0)
    # the sine schedule, sampled after each step: lr(step) with period LR_WARMUP_STEPS
    assert [r["lr"] for r in records] == pytest.approx([sine_lr(s, 8e-7, 4e-7, 4) for s in (1, 2, 3)], rel=1e-6)
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["loss_weight"]["weighting"] == "min_snr" and run["loss_weight"]["zero_weight_timesteps"] == [999]
    assert run["loss_weight"]["mean"] == pytest.approx(0.13, abs=0.01)
    assert run["device"]["bf16_weights"] is True
    assert run["config"]["data"]["vae_batch_size"] == 3 and run["config"]["train"]["ema_decay"] == 0.999

    expert = json.loads((result.pipeline_dir / "expert.json").read_text())
    assert expert["timestep_range"] == [350, 999]
    unet = load_file(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    base_unet = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet["conv_in.weight"].dtype == torch.bfloat16  # pure bf16, as SimpleTuner saved it
    assert any(not torch.equal(unet[k].float(), base_unet[k].to(torch.bfloat16).float()) for k in base_unet)
    assert any(offline_wandb.rglob("*.wandb"))  # the offline W&B run, ready for `wandb sync`

    # Re-running the same file resumes from the newest checkpoint (step 3 of 3): nothing left to train.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = train(load_config(["--env", str(env)])[0])
    assert again.summary["resumed_from"].endswith("checkpoint-3")


def test_ignored_values_a_user_counts_on_warn_with_their_reason(tmp_path: Path) -> None:
    env = tmp_path / "c.env"
    env.write_text('PUSH_TO_HUB="true"\nPUSH_CHECKPOINTS="true"\nHUB_MODEL_NAME=me/x\nDELETE_SMALL_IMAGES=1\n'
                   "FLUX_LORA_TARGET=all\nMY_SETTING=1\n")
    config, warnings = load_config(["--env", str(env)])
    text = "\n".join(warnings)
    assert "PUSH" not in text and "HUB_MODEL_NAME" not in text  # the hub variables are options now
    assert (config.hub.push_to_hub, config.hub.hub_model_id, config.hub.push_checkpoints_to_hub) == (True, "me/x", True)
    assert "DELETE_SMALL_IMAGES=1 ignored: expertune never deletes images" in text
    assert "FLUX_LORA_TARGET" not in text  # Flux-only: an info line
    assert "MY_SETTING is not a config.env variable expertune knows" in text  # still no silence for the unknown
    assert len(warnings) == 2
