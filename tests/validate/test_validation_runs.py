"""Validation inside real training runs: files, metrics.jsonl, TensorBoard, the peer chain and its guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


import pytest

from helpers import FAST_FLAGS, write_stage_env
from expertune.cli import main
from expertune.config import load_config
from expertune.train.loop import train
from expertune.train.metrics import read_metrics

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`


def _tensorboard(logs: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    files = list(logs.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {logs}"
    for event_file in files:
        acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0}).Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


STAGE_1_METRICS = {"eval/loss", "eval/loss_350_511", "eval/loss_512_674", "eval/loss_675_836", "eval/loss_837_999",
                   "clip/mean", "clip/text_to_image_prompt"}
STAGE_2_METRICS = {"eval/loss", "eval/loss_0_86", "eval/loss_87_174", "eval/loss_175_261", "eval/loss_262_349",
                   "clip/mean", "clip/partial_denoise_00", "clip/partial_denoise_01", "clip/chain_prompt"}


def test_event_files_hold_images_and_every_scalar(trained_experts) -> None:
    for result, expected, images in [
        (trained_experts[0], STAGE_1_METRICS, {"validation/text_to_image_prompt"}),
        (trained_experts[1], STAGE_2_METRICS, {"validation/partial_denoise_00", "validation/partial_denoise_01",
                                               "validation/chain_prompt"}),
    ]:
        scalars, found_images = _tensorboard(result.output_dir / "logs")
        assert {"train/loss", "train/lr", "train/grad_norm"} | expected <= scalars
        assert images <= found_images
        records = read_metrics(result.output_dir / "metrics.jsonl", kind="validation")
        assert [r["step"] for r in records] == [3] and expected <= set(records[0])
        assert all(0 <= records[0][k] <= 100 for k in expected if k.startswith("clip/"))
        assert all(records[0][k] > 0 for k in expected if k.startswith("eval/"))
        folder = result.output_dir / "validation" / "step_000003"
        assert {f"{tag.split('/')[1]}.png" for tag in images} == {p.name for p in folder.iterdir()}
    run2 = json.loads((trained_experts[1].output_dir / "run.json").read_text())
    assert any(p.endswith("chain_prompt.png") for p in run2["validation_images"])


def test_stage_1_validates_the_full_chain_through_its_peer(trained_experts, tiny_model_dir: Path,
                                                          small_dataset: Path, tmp_path: Path) -> None:
    _, stage2 = trained_experts
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"circle": "a red circle"}))
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=1", "--train_batch_size=2",
                             "--gradient_checkpointing=false", f"--validation_prompt_library={library}",
                             f"--validation_peer_expert={stage2.output_dir}"])
    result = train(config)
    names = sorted(p.name for p in (result.output_dir / "validation" / "step_000001").iterdir())
    assert names == ["chain_circle.png", "chain_prompt.png", "text_to_image_circle.png", "text_to_image_prompt.png"]
    from PIL import Image

    assert Image.open(result.output_dir / "validation" / "step_000001" / "chain_circle.png").size == (64, 64)
    _, images = _tensorboard(result.output_dir / "logs")
    assert {"validation/chain_circle", "validation/text_to_image_circle"} <= images


def test_a_mismatched_peer_is_refused_before_training(trained_experts, tiny_model_dir: Path, small_dataset: Path,
                                                      tmp_path: Path, capsys) -> None:
    _, stage2 = trained_experts
    epsilon = tmp_path / "epsilon"
    shutil.copytree(stage2.pipeline_dir, epsilon)
    info = json.loads((epsilon / "expert.json").read_text())
    (epsilon / "expert.json").write_text(json.dumps({**info, "prediction_type": "epsilon"}))
    env = write_stage_env(tmp_path, 1, tiny_model_dir, tmp_path / "out", small_dataset)
    code = main(["train", "--env", str(env), *FAST_FLAGS, f"--validation_peer_expert={epsilon}"])
    error = capsys.readouterr().err
    assert code == 2
    assert "prediction_type" in error and "'v_prediction'" in error and "'epsilon'" in error and str(epsilon) in error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
