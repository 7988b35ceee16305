"""LoRA experts: trained through the same loop, saved for diffusers' load_lora_weights, chained over one base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.infer.chain import generate, read_expert
from expertune.models.lora import LORA_WEIGHTS
from expertune.train.loop import train

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

LORA_FLAGS = [*FAST_FLAGS, "--model_type=lora", "--lora_rank=4", "--learning_rate=1e-3", "--report_to=none",
              "--validation_disable", "--train_batch_size=2", "--checkpoint_step_interval=3"]


@pytest.fixture(scope="module")
def lora_experts(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    results = []
    for stage in (1, 2):
        env = write_stage_env(root, stage, tiny_model_dir, root / f"stage{stage}", small_dataset)
        config, _ = load_config(["--env", str(env), *LORA_FLAGS])
        results.append(train(config))
    return results


def test_lora_expert_is_saved_for_diffusers(lora_experts, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    stage1, stage2 = lora_experts
    assert stage1.pipeline_dir.name == "lora" and (stage1.pipeline_dir / LORA_WEIGHTS).is_file()
    expert = json.loads((stage1.pipeline_dir / "expert.json").read_text())
    assert expert["model_type"] == "lora" and expert["timestep_range"] == [350, 999]
    assert expert["base_model"] == str(tiny_model_dir)
    weights = load_file(stage1.pipeline_dir / LORA_WEIGHTS)
    assert weights and all("lora" in key for key in weights)
    scheduler = json.loads((stage1.pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    kwargs = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64, output_type="np")
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(stage1.pipeline_dir))
    adapted = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert not (plain == adapted).all(), "the trained adapters change the model's output"


def test_a_lora_checkpoint_holds_only_the_adapters_and_their_optimizer_state(lora_experts, tiny_model_dir: Path,
                                                                               small_dataset: Path) -> None:
    stage1, _ = lora_experts
    folder = stage1.output_dir / "checkpoints" / "checkpoint-3"
    checkpoint = load_file(folder / "unet.safetensors")
    assert checkpoint and all("lora_" in key for key in checkpoint)  # not the frozen base UNet
    base_bytes = (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (folder / "unet.safetensors").stat().st_size < base_bytes / 4
    optimizer = load_file(folder / "optimizer.safetensors")
    # two moments per adapter weight and a step count per tensor: nothing of the frozen base
    assert sum(v.numel() for v in optimizer.values()) <= 2 * sum(v.numel() for v in checkpoint.values()) + len(checkpoint)

    # resuming restores the adapters onto the pretrained base and continues
    env = write_stage_env(folder.parent.parent.parent, 1, tiny_model_dir, stage1.output_dir, small_dataset)
    config, _ = load_config(["--env", str(env), *LORA_FLAGS, "--max_train_steps=4",
                             "--resume_from_checkpoint=latest", "--allow_config_change"])
    resumed = train(config)
    assert resumed.summary["resumed_from"].endswith("checkpoint-3") and resumed.steps == 4


def test_generate_chains_lora_experts_over_a_shared_base(lora_experts, tmp_path: Path) -> None:
    stage1, stage2 = lora_experts
    assert read_expert(stage2.output_dir).is_lora
    image = generate([stage2.output_dir, stage1.output_dir], "a red circle", num_inference_steps=6,
                     guidance_rescale=0.7, height=64, width=64, seed=3)
    again = generate([stage1.output_dir, stage2.output_dir], "a red circle", num_inference_steps=6,
                     guidance_rescale=0.7, height=64, width=64, seed=3)
    assert image.size == (64, 64) and list(image.getdata()) == list(again.getdata())


def test_lora_target_modules_must_match(tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *LORA_FLAGS, "--lora_target_modules=no_such_layer"])
    with pytest.raises(ConfigError, match="lora_target_modules='no_such_layer' matched no UNet module"):
        train(config)


def test_a_lora_expert_works_as_the_validation_peer(lora_experts, tiny_model_dir: Path, small_dataset: Path,
                                                    tmp_path: Path, caplog) -> None:
    import logging

    stage1, _ = lora_experts
    env = write_stage_env(tmp_path, 2, tiny_model_dir, tmp_path / "stage2", small_dataset)
    flags = [f for f in LORA_FLAGS if f != "--validation_disable"]
    config, _ = load_config(["--env", str(env), *flags, "--max_train_steps=2", "--validation_step_interval=1",
                             f"--validation_peer_expert={stage1.output_dir}"])
    with caplog.at_level(logging.INFO, logger="expertune.validate"):
        result = train(config)
    chained = sorted((result.output_dir / "validation").rglob("chain_*.png"))
    assert len(chained) == 2  # steps 1 and 2 (the final validation)
    loads = [r for r in caplog.records if "loaded once" in r.getMessage()]
    assert len(loads) == 1  # the peer is read from disk once per run, not at every validation


def test_a_lora_expert_of_a_variant_base_keeps_its_variant_for_the_chain(tiny_model_dir: Path, small_dataset: Path,
                                                                         tmp_path: Path) -> None:
    """--variant is kept where the base is read again: in expert.json, and by the chain that loads the base under
    a LoRA expert (a base saved only as its fp16 variant cannot be read without it)."""
    from diffusers import StableDiffusionXLPipeline

    from expertune.expert_format import ExpertDescription

    variant_only = tmp_path / "variant-base"
    StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir)).save_pretrained(variant_only, variant="fp16")
    assert not (variant_only / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises((OSError, ValueError)):  # the control: the plain weights file is not there
        StableDiffusionXLPipeline.from_pretrained(str(variant_only), use_safetensors=True)
    results = []
    for stage in (1, 2):
        env = write_stage_env(tmp_path, stage, variant_only, tmp_path / f"stage{stage}", small_dataset)
        config, _ = load_config(["--env", str(env), *LORA_FLAGS, "--variant=fp16", "--max_train_steps=1"])
        results.append(train(config))
    description = ExpertDescription.read(results[0].pipeline_dir)
    assert description.base_model == str(variant_only) and description.base_variant == "fp16"
    assert description.base_revision is None
    image = generate([r.output_dir for r in results], "a red circle", num_inference_steps=4, height=64, width=64,
                     seed=1)
    assert image.size == (64, 64)
