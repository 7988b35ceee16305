"""All experts of a mixture trained in one job: the rows of metrics.jsonl, the saved mixture, one checkpoint that
holds every expert and resumes bitwise (also after SIGKILL), joint training equal to separate jobs, DDP, and
validation of the chain and of each expert."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import FAST_FLAGS, same_weights
from expertune.cli import main
from expertune.config import load_config
from expertune.expert_format import ExpertDescription, MixtureDescription
from expertune.experts import ExpertBand
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
THREE = "700,350"
BANDS = [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]


def _flags(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [*FAST_FLAGS, "--report_to=none", "--validation_disable", "--train_batch_size=2", "--lr_scheduler=constant",
            f"--pretrained_model_name_or_path={model}", f"--data_backend_config={data}", f"--output_dir={output}",
            "--prediction_type=v_prediction", "--rescale_betas_zero_snr", *extra]


def _config(model: Path, data: Path, output: Path, *extra: str):
    config, _ = load_config(_flags(model, data, output, *extra))
    return config


@pytest.fixture(scope="module")
def three_experts(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory) -> Path:
    """A three-expert job of 9 steps, experts taking turns, checkpoints every 3 steps."""
    output = tmp_path_factory.mktemp("mixture") / "run"
    train(_config(tiny_model_dir, small_dataset, output, f"--mixture_boundaries={THREE}", "--max_train_steps=9",
                  "--checkpoint_step_interval=3", "--expert_learning_rates=1e-4,5e-5,2e-4"))
    return output


def test_every_row_names_its_expert_and_its_timesteps_lie_in_that_band(three_experts: Path) -> None:
    rows = read_metrics(three_experts / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["expert"] for r in rows] == [0, 1, 2] * 3
    assert [r["expert_step"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for row in rows:
        band = BANDS[row["expert"]]
        assert band.lo <= row["timestep_min"] <= row["timestep_max"] <= band.hi, row
    assert [r["lr"] for r in rows[:3]] == [1e-4, 5e-5, 2e-4]  # a learning rate per expert


def test_the_mixture_on_disk_is_plain_diffusers_experts_listed_in_chain_order(three_experts: Path,
                                                                              tiny_model_dir: Path) -> None:
    mixture = MixtureDescription.read(three_experts)
    assert [m.band for m in mixture.experts] == [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]
    assert [m.path for m in mixture.experts] == [f"expert-{k}/pipeline" for k in range(3)]
    assert mixture.parameterisation["prediction_type"] == "v_prediction"
    assert mixture.parameterisation["rescale_betas_zero_snr"] is True
    base = load_file(tiny_model_dir / WEIGHTS)
    weights = [load_file(three_experts / m.path / WEIGHTS) for m in mixture.experts]
    for k, member in enumerate(mixture.experts):
        assert ExpertDescription.read(three_experts / member.path).band == member.band
        assert any(not torch.equal(weights[k][name], base[name]) for name in base), f"expert {k} did not train"
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in base)  # three different experts
    summary = json.loads((three_experts / "run.json").read_text())
    assert [e["steps"] for e in summary["mixture"]["experts"]] == [3, 3, 3]
    assert [e["learning_rate"] for e in summary["mixture"]["experts"]] == [1e-4, 5e-5, 2e-4]


def test_one_checkpoint_holds_every_expert_and_resumes_exactly(three_experts: Path, tiny_model_dir: Path,
                                                               small_dataset: Path, tmp_path: Path) -> None:
    checkpoint = three_experts / "checkpoints" / "checkpoint-6"
    assert json.loads((checkpoint / "state.json").read_text())["experts"] == 3
    assert [json.loads((checkpoint / f"expert-{k}" / "state.json").read_text())["step"] for k in range(3)] == [2, 2, 2]
    output = tmp_path / "resumed"
    flags = [f"--mixture_boundaries={THREE}", "--checkpoint_step_interval=3", "--expert_learning_rates=1e-4,5e-5,2e-4"]
    train(_config(tiny_model_dir, small_dataset, output, *flags, "--max_train_steps=4"))
    train(_config(tiny_model_dir, small_dataset, output, *flags, "--max_train_steps=9",
                  "--resume_from_checkpoint=checkpoint-3", "--allow_config_change"))
    for k in range(3):
        assert same_weights(output / f"expert-{k}" / "pipeline" / WEIGHTS, three_experts / f"expert-{k}" / "pipeline" / WEIGHTS)
    assert [r["loss"] for r in read_metrics(output / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(three_experts / "metrics.jsonl")]


def test_joint_training_equals_separate_jobs_of_each_expert(tiny_model_dir: Path, small_dataset: Path,
                                                            tmp_path: Path) -> None:
    """Each expert keeps its own data stream and random stream, seeded as a job of its own would be: two
    experts taking turns for 6 steps are bitwise the experts of two 3-step jobs on their bands."""
    joint = tmp_path / "joint"
    train(_config(tiny_model_dir, small_dataset, joint, "--mixture_boundaries=350", "--max_train_steps=6"))
    for k, band in enumerate(["350,999", "0,349"]):
        alone = tmp_path / f"alone-{k}"
        train(_config(tiny_model_dir, small_dataset, alone, f"--timestep_range={band}", "--max_train_steps=3"))
        assert same_weights(joint / f"expert-{k}" / "pipeline" / WEIGHTS, alone / "pipeline" / WEIGHTS), k


def test_two_processes_train_the_mixture_as_one_process_with_twice_the_batch(tiny_model_dir: Path, small_dataset: Path,
                                                                              tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--mixture_boundaries=350", "--max_train_steps=4", "--adam_epsilon=1e-2"]
    train(_config(tiny_model_dir, small_dataset, one, *common))
    flags = _flags(tiny_model_dir, small_dataset, two, *common)
    flags = [f for f in flags if f != "--train_batch_size=2"] + ["--train_batch_size=1", "--num_processes=2"]
    assert main(["train", *flags]) == 0
    for k in range(2):
        a = load_file(one / f"expert-{k}" / "pipeline" / WEIGHTS)
        b = load_file(two / f"expert-{k}" / "pipeline" / WEIGHTS)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    assert [r["expert"] for r in read_metrics(two / "metrics.jsonl")] == [0, 1, 0, 1]


def test_validation_of_each_expert_the_chain_and_the_mixture_loss(tiny_model_dir: Path, small_dataset: Path,
                                                                  tmp_path: Path) -> None:
    output = tmp_path / "validated"
    flags = [f for f in _flags(tiny_model_dir, small_dataset, output) if f != "--validation_disable"]
    config, _ = load_config([*flags, "--mixture_boundaries=350", "--max_train_steps=2", "--validation_step_interval=1",
                             "--validation_using_datasets", "--eval_holdout_fraction=0.17",
                             "--eval_timesteps_per_subband=2"])
    train(config)
    step1 = output / "validation" / "step_000001"
    assert (step1 / "expert_0" / "text_to_image_prompt.png").is_file()  # text-to-image up to the hand-off
    assert sorted(p.name for p in (step1 / "expert_1").glob("partial_denoise_*.png"))  # from real images
    assert (step1 / "expert_0" / "chain_prompt.png").is_file()  # the whole chain of the current experts
    rows = read_metrics(output / "metrics.jsonl", kind="validation")
    by_expert = {(r["step"], r["expert"]): r for r in rows}
    for step in (1, 2):
        low, high = by_expert[(step, 1)]["eval/loss"], by_expert[(step, 0)]["eval/loss"]
        assert by_expert[(step, "mixture")]["eval/mixture_loss"] == pytest.approx((650 * high + 350 * low) / 1000)
    # Step 2 trained expert 1 only: expert 0's held-out loss is unchanged, expert 1's moved.
    assert by_expert[(2, 0)]["eval/loss"] == by_expert[(1, 0)]["eval/loss"]
    assert by_expert[(2, 1)]["eval/loss"] != by_expert[(1, 1)]["eval/loss"]


def test_generate_mixture_equals_the_plain_diffusers_chain_of_three_experts(three_experts: Path, tmp_path: Path) -> None:
    """What docs/mixtures.md shows: the first expert text-to-image up to its `denoising_end`, each middle one
    `StableDiffusionXLImg2ImgPipeline` with `denoising_start` and `denoising_end`, the last from its start."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from expertune.infer.chain import generate_images, mixture_expert_paths

    mixture = MixtureDescription.read(three_experts)
    paths = [str(three_experts / m.path) for m in mixture.experts]
    prompt, steps = "a red circle on a blue background", 12
    generator = torch.Generator().manual_seed(0)
    common = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=7.5, generator=generator)
    first = StableDiffusionXLPipeline.from_pretrained(paths[0])
    latents = first(**common, denoising_end=mixture.experts[0].band.denoising_end, output_type="latent",
                    height=64, width=64).images
    for member, path in zip(mixture.experts[1:], paths[1:]):
        later = StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
        last = member is mixture.experts[-1]
        latents = later(**common, image=latents, denoising_start=member.band.denoising_start,
                        denoising_end=member.band.denoising_end, output_type="pil" if last else "latent").images
    expected = np.asarray(latents[0])
    ours = generate_images(mixture_expert_paths(three_experts), prompt, num_inference_steps=steps, device="cpu",
                           height=64, width=64)[0]
    assert np.array_equal(np.asarray(ours), expected)
    out = tmp_path / "mixture.png"
    assert main(["generate", "--mixture", str(three_experts), "--prompt", prompt, "--steps", str(steps),
                 "--device", "cpu", "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    # A prompt per expert: each expert is conditioned on its own, and the image changes.
    own = generate_images(paths, [prompt, prompt, "a green square on a white background"], num_inference_steps=steps,
                          device="cpu", height=64, width=64)[0]
    assert not np.array_equal(np.asarray(own), expected)
    assert main(["generate", "--mixture", str(three_experts), "--prompt", "a", "--prompt", "b", "--device", "cpu",
                 "--out", str(out)]) == 2  # two prompts for three experts: refused, exit 2


def test_a_lora_mixture_saves_one_adapter_set_per_expert_and_chains_them(tiny_model_dir: Path, small_dataset: Path,
                                                                         tmp_path: Path) -> None:
    output = tmp_path / "lora"
    train(_config(tiny_model_dir, small_dataset, output, "--mixture_boundaries=350", "--max_train_steps=4",
                  "--model_type=lora", "--lora_rank=4", "--learning_rate=1e-3"))
    mixture = MixtureDescription.read(output)
    assert [m.path for m in mixture.experts] == ["expert-0/lora", "expert-1/lora"]
    assert [m.model_type for m in mixture.experts] == ["lora", "lora"]
    adapters = [load_file(next((output / m.path).glob("*.safetensors"))) for m in mixture.experts]
    assert adapters[0].keys() == adapters[1].keys()
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # two sets, trained apart
    out = tmp_path / "lora.png"
    assert main(["generate", "--mixture", str(output), "--prompt", "a red circle", "--steps", "6", "--device", "cpu",
                 "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_a_mixture_of_a_base_and_the_refiner_architecture(tiny_model_dir: Path, tiny_refiner_dir: Path,
                                                          small_dataset: Path, tmp_path: Path) -> None:
    """The low-noise expert starts from a model of the SDXL refiner layout (text encoder 2 only, aesthetic-score
    time ids): trained in the same job on the shared latents with its own text embeddings, validated in the chain,
    saved as a plain refiner pipeline and chained by generate --mixture."""
    from expertune.errors import ConfigError

    output = tmp_path / "base-and-refiner"
    flags = [f for f in _flags(tiny_model_dir, small_dataset, output) if f != "--validation_disable"]
    config, _ = load_config([*flags, "--mixture_boundaries=350", f"--expert_models=,{tiny_refiner_dir}",
                             "--max_train_steps=4", "--validation_using_datasets"])
    train(config)
    rows = read_metrics(output / "metrics.jsonl")
    assert [r["expert"] for r in rows] == [0, 1, 0, 1]
    assert all(r["timestep_max"] <= 349 for r in rows if r["expert"] == 1)
    index = json.loads((output / "expert-1" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None]
    refiner = load_file(output / "expert-1" / "pipeline" / WEIGHTS)
    start = load_file(tiny_refiner_dir / WEIGHTS)
    assert refiner.keys() == start.keys() and any(not torch.equal(refiner[k], start[k]) for k in start)
    final = output / "validation" / "step_000004"
    assert (final / "expert_0" / "chain_prompt.png").is_file()  # base then refiner, each with its own embeddings
    assert sorted(p.name for p in (final / "expert_1").glob("partial_denoise_*.png"))
    experts = json.loads((output / "run.json").read_text())["mixture"]["experts"]
    assert experts[1]["model"] == str(tiny_refiner_dir)
    assert experts[1]["cache"]["latents_encoded"] == 0 and experts[1]["cache"]["embeds_encoded"] > 0  # shared latents
    out = tmp_path / "chain.png"
    assert main(["generate", "--mixture", str(output), "--prompt", "a red circle", "--steps", "6", "--device", "cpu",
                 "--height", "64", "--width", "64", "--out", str(out)]) == 0
    with pytest.raises(ConfigError, match="has the SDXL refiner layout, and expert 0 owns"):
        train(_config(tiny_model_dir, small_dataset, tmp_path / "refused", "--mixture_boundaries=350",
                      f"--expert_models={tiny_refiner_dir},"))


def test_offloading_the_inactive_experts_trains_the_same_experts(tiny_model_dir: Path, small_dataset: Path,
                                                                 tmp_path: Path) -> None:
    """With --mixture_offload_inactive the job validates and exports as without it, with the same weights (on a
    CPU-only machine nothing moves; on a GPU the inactive experts wait in CPU memory)."""
    runs = {}
    for name, extra in (("kept", []), ("offloaded", ["--mixture_offload_inactive"])):
        output = tmp_path / name
        flags = [f for f in _flags(tiny_model_dir, small_dataset, output) if f != "--validation_disable"]
        config, _ = load_config([*flags, "--mixture_boundaries=350", "--max_train_steps=4", *extra])
        train(config)
        runs[name] = output
    for k in range(2):
        path = Path(f"expert-{k}") / "pipeline" / WEIGHTS
        assert same_weights(runs["kept"] / path, runs["offloaded"] / path)
    assert (runs["offloaded"] / "validation" / "step_000004" / "expert_0" / "chain_prompt.png").is_file()


def test_the_cache_verb_builds_every_expert_models_embeddings(tiny_model_dir: Path, tiny_refiner_dir: Path,
                                                             small_dataset: Path, tmp_path: Path) -> None:
    """`expertune cache` with a mixture plan encodes the refiner expert's own text embeddings too, so the job
    that follows encodes nothing for either model."""
    output = tmp_path / "cached-first"
    flags = [*_flags(tiny_model_dir, small_dataset, output), "--mixture_boundaries=350",
             f"--expert_models=,{tiny_refiner_dir}", "--max_train_steps=2"]
    assert main(["cache", *flags]) == 0
    config, _ = load_config(flags)
    summary = train(config).summary
    assert summary["cache"]["latents_encoded"] == 0 and summary["cache"]["embeds_encoded"] == 0
    refiner = summary["mixture"]["experts"][1]["cache"]
    assert refiner["embeds_encoded"] == 0 and refiner["embeds_reused"] > 0
