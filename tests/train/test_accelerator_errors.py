"""A CUDA out-of-memory error inside a training step is one `expertune: error:` line (exit 4) naming the settings
in use and what would fit; the traceback only behind -v. The error is torch's own type, raised from inside the
UNet's forward by a registered forward hook: the training step is real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertune.cli import main
from expertune.config import Config
from expertune.train.accelerator_errors import failure_message, what_would_fit


def _raise_out_of_memory(module: torch.nn.Module, args: object, output: object) -> None:
    if type(module).__name__ == "UNet2DConditionModel" and module.training:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.6 GiB total)")


@pytest.mark.integration
@pytest.mark.parametrize("verbose", [False, True])
def test_out_of_memory_in_a_training_step_is_one_line(verbose: bool, tiny_model_dir: Path, small_dataset: Path,
                                                     tmp_path: Path, capsys) -> None:
    flags = ["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={small_dataset}",
             f"--output_dir={tmp_path / 'out'}", "--max_train_steps=2", "--resolution=64", "--train_batch_size=2",
             "--report_to=none", "--validation_disable"]
    hook = torch.nn.modules.module.register_module_forward_hook(_raise_out_of_memory)
    try:
        code = main((["-v"] if verbose else []) + flags)
    finally:
        hook.remove()
    err = capsys.readouterr().err
    assert code == 4
    (line,) = [line for line in err.splitlines() if line.startswith("expertune: error:")]
    assert "ran out of memory while training (CUDA out of memory. Tried to allocate 20.00 GiB" in line
    for setting in ("train_batch_size=2", "resolution=64 (pixel)", "mixed_precision=no", "optimizer=adamw",
                    "gradient_checkpointing=false"):
        assert setting in line, setting
    for option in ("--gradient_checkpointing", "--train_batch_size=1 --gradient_accumulation_steps=2",
                   "--mixed_precision=bf16", "--optimizer=adamw8bit", "--model_type=lora"):
        assert option in line, option
    assert ("Traceback" in err and "OutOfMemoryError" in err) == verbose


def test_advice_leaves_out_what_is_already_set() -> None:
    lean = Config.from_flat({"gradient_checkpointing": True, "mixed_precision": "bf16", "optimizer": "adamw8bit",
                             "model_type": "lora", "resolution": 512.0})
    assert what_would_fit(lean) == []
    message = failure_message(lean, "training", torch.OutOfMemoryError("CUDA out of memory."))
    assert "every memory-saving option is already on" in message
    mixture = Config.from_flat({"mixture_boundaries": "500", "train_batch_size": 4, "gradient_accumulation_steps": 3})
    advice = what_would_fit(mixture)
    assert "--mixture_offload_inactive" in advice
    assert "--train_batch_size=2 --gradient_accumulation_steps=6 (the same samples per step)" in advice
    assert "a lower --resolution than 1024" in advice


def test_other_accelerator_errors_say_how_to_find_the_operation() -> None:
    message = failure_message(Config(), "training", torch.AcceleratorError("CUDA error: an illegal memory access"))
    assert "AcceleratorError: CUDA error: an illegal memory access" in message
    assert "CUDA_LAUNCH_BLOCKING=1" in message and "\n" not in message
