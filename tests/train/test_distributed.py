"""Two CPU processes (gloo) with batch b train the same weights as one process with batch 2b."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.cli import main
from expertune.config import load_config
from expertune.train.launch import launch_command
from expertune.train.loop import train
from expertune.train.metrics import read_metrics
from expertune.train.signals import NONFINITE_AT

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
FLAGS = [*FAST_FLAGS, "--report_to=none", "--validation_disable", "--max_train_steps=3", "--lr_scheduler=constant",
         "--caption_dropout_probability=0.3", "--timestep_sampling=stratified", "--checkpoint_step_interval=3",
         # Adam divides by sqrt(v): for near-zero gradients the update's sign follows float noise. A large
         # epsilon keeps updates proportional to the gradient, so the comparison measures the trainer.
         "--adam_epsilon=1e-2"]


def test_two_processes_equal_one_process_with_twice_the_batch(tiny_model_dir: Path, small_dataset: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when one process alone sees a non-finite loss: every process skips that update (a process that
    stepped anyway would leave the pair's weights apart from the single process's, which skips it too)."""
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "unused", small_dataset)
    single_dir, pair_dir = tmp_path / "one-process", tmp_path / "two-processes"
    config, _ = load_config(["--env", str(env), *FLAGS, "--train_batch_size=2", f"--output_dir={single_dir}"])
    monkeypatch.setenv(NONFINITE_AT, "0:2")  # the second step's first try
    train(config)
    monkeypatch.setenv(NONFINITE_AT, "1:2")  # the same try, seen by the second process only
    # `expertune train --num_processes=2` launches accelerate itself (a real 2-rank gloo group on CPUs).
    code = main(["train", "--env", str(env), *FLAGS, "--train_batch_size=1", "--num_processes=2",
                 f"--output_dir={pair_dir}"])
    assert code == 0
    one, two = load_file(single_dir / UNET), load_file(pair_dir / UNET)
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in one)  # it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
    single_metrics, pair_metrics = read_metrics(single_dir / "metrics.jsonl"), read_metrics(pair_dir / "metrics.jsonl")
    assert [r["samples"] for r in pair_metrics] == [2, 2, 2]
    for folder in (single_dir, pair_dir):
        assert [r["step"] for r in read_metrics(folder / "metrics.jsonl", kind="skipped")] == [2]
    for a, b in zip(single_metrics, pair_metrics, strict=True):
        assert (a["timestep_min"], a["timestep_max"]) == (b["timestep_min"], b["timestep_max"])
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"])
    # The checkpoint written by the group resumes in a single process too (same shared RNG stream).
    assert (pair_dir / "checkpoints" / "checkpoint-3" / "state.json").is_file()


def test_launch_command_uses_accelerate(tmp_path: Path) -> None:
    config, _ = load_config(["--num_processes=4", "--num_machines=2", "--accelerate_extra_args=--main_process_port 29555"])
    command = launch_command(config, ["--env", "x.env"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("--num_machines") + 1] == "2"
    assert command[-5:] == ["-m", "expertune.cli", "train", "--env", "x.env"]
    assert "--main_process_port" in command
    with_file, _ = load_config([f"--accelerate_config={tmp_path / 'fsdp.yaml'}"])
    command = launch_command(with_file, [])
    assert "--config_file" in command and "--multi_gpu" not in command


def test_example_accelerate_configs_are_valid_and_launchable() -> None:
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from expertune.train.launch import engine_in_config_file

    folder = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
    files = sorted(folder.glob("*.yaml"))
    assert {f.name for f in files} >= {"multi_gpu.yaml", "multi_node.yaml", "cpu_two_processes.yaml", "fsdp.yaml",
                                       "fsdp_multi_node.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                       "deepspeed_multi_node.yaml"}
    engines = {}
    for file in files:
        settings = yaml.safe_load(file.read_text())
        assert settings["distributed_type"] in ("MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"), file
        assert settings["num_processes"] >= 2 and settings["num_machines"] >= 1
        if settings["num_machines"] > 1:
            assert settings["num_processes"] % settings["num_machines"] == 0 and settings["main_process_ip"]
        cluster = load_config_from_file(str(file))  # accelerate's own reader accepts every key
        assert cluster.distributed_type.value == settings["distributed_type"]
        engines[file.name] = engine_in_config_file(file)
        config, _ = load_config([f"--accelerate_config={file}"])
        command = launch_command(config, ["--env", "x.env"])
        assert command[command.index("--config_file") + 1] == str(file)
    assert engines["fsdp.yaml"] == "fsdp" and engines["deepspeed_zero3.yaml"] == "deepspeed"
    assert engines["multi_gpu.yaml"] is None
    fsdp = yaml.safe_load((folder / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {BasicTransformerBlock.__name__,
                                                                         ResnetBlock2D.__name__}
