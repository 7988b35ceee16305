"""SIGTERM during a LoRA mixture: the checkpoint, then the experts exported in both layouts (integration)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import FAST_FLAGS
from expertune.errors import TrainingInterrupted
from expertune.export.formats import SINGLE_FILE_DIR, WORKFLOW_FILE
from expertune.export_run import export_run
from expertune.models.lora import LORA_WEIGHTS

pytestmark = pytest.mark.integration


def _terminate_after_first_step(output: Path) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = output / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_interrupted_lora_mixture_exports_after_its_checkpoint(tiny_model_dir: Path, small_dataset: Path,
                                                                  tmp_path: Path) -> None:
    from expertune.config import load_config
    from expertune.train.loop import train

    output = tmp_path / "mixture"
    config, _ = load_config([*FAST_FLAGS, "--max_train_steps=200", "--report_to=none", "--validation_disable",
                             f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={small_dataset}",
                             f"--output_dir={output}", "--prediction_type=v_prediction", "--rescale_betas_zero_snr",
                             "--mixture_boundaries=350", "--model_type=lora", "--lora_rank=4", "--lora_alpha=8",
                             "--learning_rate=1e-2", "--checkpoint_step_interval=1000",
                             "--export_format=diffusers,single_file"])
    watcher = _terminate_after_first_step(output)
    with pytest.raises(TrainingInterrupted):
        train(config)
    watcher.join(timeout=5)
    (checkpoint,) = sorted((output / "checkpoints").glob("checkpoint-*"))
    mixture = json.loads((output / "mixture.json").read_text())
    assert [e["path"] for e in mixture["experts"]] == ["expert-0/lora", "expert-1/lora"]
    files = sorted(p.name for p in (output / SINGLE_FILE_DIR).iterdir())
    assert files == ["mixture-expert-0-t350-999_lora.safetensors", "mixture-expert-1-t0-349_lora.safetensors",
                     WORKFLOW_FILE]
    with safe_open(str(output / SINGLE_FILE_DIR / files[0]), "pt") as handle:
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
        assert alphas == {8.0} and handle.metadata()["modelspec.prediction_type"] == "v"
    workflow = json.loads((output / SINGLE_FILE_DIR / WORKFLOW_FILE).read_text())
    loras = [n["inputs"]["lora_name"] for n in workflow.values() if n["class_type"] == "LoraLoader"]
    assert loras == files[:2]
    samplings = [n["inputs"] for n in workflow.values() if n["class_type"] == "ModelSamplingDiscrete"]
    assert samplings and all(s["sampling"] == "v_prediction" and s["zsnr"] is True for s in samplings)
    assert len(samplings) == 2

    # the checkpoint exports to the same adapters the interrupted run exported
    out = export_run(checkpoint, tmp_path / "from-checkpoint", precision="bf16")[0].parent
    for k in (0, 1):
        ours, theirs = load_file(out / f"expert-{k}" / "lora" / LORA_WEIGHTS), load_file(
            output / f"expert-{k}" / "lora" / LORA_WEIGHTS)
        assert ours.keys() == theirs.keys()
        assert all(ours[n].dtype == torch.bfloat16 and torch.equal(ours[n], theirs[n].bfloat16()) for n in ours)
