"""`expertune train` of an expert from an SDXL-refiner-layout model, from a config.env, end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import FAST_FLAGS
from expertune.cli import main
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains: not in `make test-fast`


def _refiner_env(folder: Path, model: Path, output: Path, dataloader: Path, extra: str = "") -> Path:
    """A SimpleTuner-style config.env training the refiner architecture on its own low-noise band."""
    path = folder / "refiner.env"
    path.write_text(f'''export MODEL_TYPE="full"
export MODEL_FAMILY="sdxl"
export MODEL_NAME="{model}"
export OUTPUT_DIR="{output}"
export DATALOADER_CONFIG="{dataloader}"
export LEARNING_RATE=1e-4
export TRAIN_BATCH_SIZE=2
export TRAINER_EXTRA_ARGS="--refiner_training --refiner_training_strength=0.35 --data_aesthetic_score=5.6"
export TRAINER_EXTRA_ARGS="${{TRAINER_EXTRA_ARGS}} --validation_using_datasets {extra}"
''', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def refiner_run(tiny_model_dir: Path, tiny_refiner_dir: Path, small_dataset: Path,
                tmp_path_factory: pytest.TempPathFactory):
    from expertune.data.captioned import write_dataloader_config

    root = tmp_path_factory.mktemp("refiner-run")
    dataloader = write_dataloader_config(root / "dataloader.json", small_dataset.parent / "images", root / "cache",
                                         resolution=64)
    # The base model's caches first (`expertune cache`), as a base expert's job would leave them.
    assert main(["cache", f"--pretrained_model_name_or_path={tiny_model_dir}",
                 f"--data_backend_config={dataloader}", *FAST_FLAGS]) == 0
    env = _refiner_env(root, tiny_refiner_dir, root / "refiner", dataloader)
    assert main(["train", "--env", str(env), *FAST_FLAGS, "--report_to=none"]) == 0
    return root, root / "refiner"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refiner_trains_its_band_sharing_latents_but_not_text_embeddings(refiner_run, tiny_refiner_dir: Path) -> None:
    _, output = refiner_run
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 <= r["timestep_min"] <= r["timestep_max"] <= 349 and r["loss"] > 0 for r in records)
    run = json.loads((output / "run.json").read_text())
    # Six images, six captions and the validation prompt: every latent is the base's (same VAE), every text
    # embedding is the refiner's own (text encoder 2 only).
    assert run["cache"] == {"latents_encoded": 0, "latents_reused": 6, "embeds_encoded": 7, "embeds_reused": 0}
    assert run["config"]["data"]["data_aesthetic_score"] == 5.6  # SimpleTuner's option, through TRAINER_EXTRA_ARGS
    assert run["expert"]["timestep_range"] == [0, 349]
    validation = sorted(p.name for p in (output / "validation" / "step_000003").iterdir())
    assert validation == ["partial_denoise_00.png", "partial_denoise_01.png"]



def test_cache_verb_on_the_refiner_finds_everything_the_run_encoded(refiner_run, tiny_refiner_dir: Path) -> None:
    root, _ = refiner_run
    stats = root / "refiner-cache.json"
    assert main(["cache", f"--pretrained_model_name_or_path={tiny_refiner_dir}",
                 f"--data_backend_config={root / 'dataloader.json'}", *FAST_FLAGS, f"--stats_json={stats}"]) == 0
    assert json.loads(stats.read_text())["cache"] == {"latents_encoded": 0, "latents_reused": 6,
                                                      "embeds_encoded": 0, "embeds_reused": 7}


def test_refiner_expert_is_a_plain_refiner_pipeline(refiner_run, tiny_refiner_dir: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipeline = refiner_run[1] / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None] and not (pipeline / "text_encoder").exists()
    assert json.loads((pipeline / "expert.json").read_text())["timestep_range"] == [0, 349]
    for frozen in ("text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert _digest(pipeline / frozen) == _digest(tiny_refiner_dir / frozen)
    trained = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    source = load_file(tiny_refiner_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == source.keys() and any(not (trained[k] == source[k]).all() for k in trained)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(pipeline), use_safetensors=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score


@pytest.fixture(scope="module")
def base_expert(refiner_run, tiny_model_dir: Path) -> Path:
    """The tiny base as the high-noise expert of the refiner's chain (untrained; same parameterisation)."""
    from expertune.expert_format import ExpertDescription
    from expertune.experts import ExpertBand

    root, output = refiner_run
    base = root / "base-expert"
    shutil.copytree(tiny_model_dir, base)
    trained = ExpertDescription.read(output / "pipeline")
    ExpertDescription(ExpertBand(350, 999), trained.parameterisation).write(base)
    return base


def test_trained_refiner_continues_a_base_expert_in_generate(refiner_run, base_expert: Path) -> None:
    from PIL import Image

    root, output = refiner_run
    out = root / "chained.png"
    assert main(["generate", "--expert", str(output), "--expert", str(base_expert), "--prompt", "a red circle",
                 "--steps", "6", "--height", "64", "--width", "64", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_a_lora_expert_of_the_refiner_chains_on_its_base(tiny_refiner_dir: Path, refiner_run,
                                                           base_expert: Path) -> None:
    from expertune.infer.chain import expert_layout_kind, generate, read_expert

    root, _ = refiner_run
    env = _refiner_env(root, tiny_refiner_dir, root / "lora", root / "dataloader.json", "--lora_rank=4")
    assert main(["train", "--env", str(env), *FAST_FLAGS, "--report_to=none", "--model_type=lora",
                 "--max_train_steps=2"]) == 0
    expert = read_expert(root / "lora")
    assert expert.is_lora and expert_layout_kind(expert) == "refiner"
    image = generate([base_expert, root / "lora"], "a red circle", num_inference_steps=6, height=64,
                     width=64, device="cpu")
    assert image.size == (64, 64)
