"""DeepSpeed ZeRO through accelerate config files, run for real on two CPU processes (gloo).

The shipped example files are used as they are, with only the process count lowered to 2. ZeRO-2 and ZeRO-3
must train the same weights as one process with the doubled batch, and a ZeRO checkpoint must resume to the
same weights as the uninterrupted run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import deepspeed  # a test dependency, installed by the Makefile: a missing one must fail, not skip
import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.cli import main
from expertune.config import load_config
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`


DEEPSPEED_VERSION = deepspeed.__version__
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
FLAGS = [*FAST_FLAGS, "--report_to=none", "--max_train_steps=4", "--lr_scheduler=constant",
         "--mixed_precision=no", "--adam_epsilon=1e-2", "--caption_dropout_probability=0.3",
         "--gradient_accumulation_steps=2", "--max_grad_norm=1.0"]


@pytest.fixture(scope="module")
def stage_env(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("deepspeed")
    return write_stage_env(folder, 1, tiny_model_dir, folder / "unused", small_dataset)


@pytest.fixture(scope="module")
def one_process(stage_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batch 2, the same four steps."""
    out = tmp_path_factory.mktemp("one-process")
    config, _ = load_config(["--env", str(stage_env), *FLAGS, "--validation_disable", "--train_batch_size=2",
                             f"--output_dir={out}"])
    train(config)
    return out


def _deepspeed_train(stage_env: Path, yaml_name: str, out: Path, *extra: str) -> int:
    return main(["train", "--env", str(stage_env), *FLAGS, "--train_batch_size=1", "--num_processes=2",
                 f"--accelerate_config={EXAMPLES / yaml_name}", f"--output_dir={out}", *extra])


def _assert_same_weights(a: Path, b: Path, rtol: float, atol: float) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=rtol, atol=atol, msg=name)


def test_zero2_matches_one_process_and_resumes_exactly(stage_env: Path, one_process: Path, tmp_path: Path) -> None:
    full = tmp_path / "zero2"
    assert _deepspeed_train(stage_env, "deepspeed_zero2.yaml", full, "--validation_disable",
                            "--checkpoint_step_interval=2") == 0
    run = (full / "run.json").read_text()
    assert '"samples": 4' in run  # 2 processes x batch 1 x 2 accumulation steps per optimizer step
    _assert_same_weights(one_process / UNET, full / UNET, rtol=1e-4, atol=1e-6)
    reference, sharded = read_metrics(one_process / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    for a, b in zip(reference, sharded, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"])

    # The same run as if it had stopped after checkpoint-2, resumed: it must end with the same weights.
    reference = tmp_path / "reference"
    shutil.copytree(full, reference)
    state = (full / "checkpoints" / "checkpoint-2" / "state.json").read_text()
    assert '"optimizer_layout": "deepspeed-full"' in state
    shutil.rmtree(full / "checkpoints" / "checkpoint-4")
    shutil.rmtree(full / "pipeline")
    assert _deepspeed_train(stage_env, "deepspeed_zero2.yaml", full, "--validation_disable",
                            "--checkpoint_step_interval=2", "--resume_from_checkpoint=latest") == 0
    _assert_same_weights(reference / UNET, full / UNET, rtol=0, atol=1e-7)
    final = reference / "checkpoints" / "checkpoint-4" / "unet.safetensors"
    _assert_same_weights(final, full / "checkpoints" / "checkpoint-4" / "unet.safetensors", rtol=0, atol=1e-7)
    assert all(t.dtype == torch.float32 for t in load_file(final).values())
    assert [r["step"] for r in read_metrics(full / "metrics.jsonl")] == [1, 2, 3, 4]


def test_zero3_gathers_for_validation_and_export(stage_env: Path, one_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    assert _deepspeed_train(stage_env, "deepspeed_zero3.yaml", out, "--validation_step_interval=2") == 0
    _assert_same_weights(one_process / UNET, out / UNET, rtol=1e-4, atol=1e-6)
    images = sorted(p.relative_to(out).as_posix() for p in (out / "validation").rglob("*.png"))
    assert images and {p.split("/")[1] for p in images} == {"step_000002", "step_000004"}
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(out / "pipeline"))
    assert pipeline.unet.dtype == torch.float32


def test_zero2_bf16_casts_the_batch_and_exports_fp32_master_weights(stage_env: Path, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    # DeepSpeed keeps the UNet itself in bf16: the batch must be cast to it, and the export must take the fp32
    # master weights (a bf16 copy would round away updates of 1e-4 x the weight).
    out = tmp_path / "bf16"
    code = main(["train", "--env", str(stage_env), *FAST_FLAGS, "--report_to=none", "--max_train_steps=2",
                 "--train_batch_size=1", "--num_processes=2", "--mixed_precision=bf16", "--validation_disable",
                 f"--accelerate_config={EXAMPLES / 'deepspeed_zero2.yaml'}", f"--output_dir={out}"])
    assert code == 0
    weights = load_file(out / UNET)
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    changed = [name for name in base if not torch.equal(weights[name], base[name])]
    assert changed
    assert any(not torch.equal(weights[n], weights[n].to(torch.bfloat16).float()) for n in changed)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
