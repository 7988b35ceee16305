"""`expertune export` and the run's own export formats, on a tiny run with checkpoints (integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import FAST_FLAGS, write_stage_env
from expertune.cli import main
from expertune.errors import ConfigError
from expertune.export.formats import SINGLE_FILE_DIR, WORKFLOW_FILE
from expertune.export_run import EXPORT_FILE, export_run

pytestmark = pytest.mark.integration

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 of the recipe (v-prediction, zero-terminal SNR), 3 steps with EMA exported, checkpoints at 2 and 3,
    and both export formats at the end."""
    from expertune.config import load_config
    from expertune.train.loop import train

    root = tmp_path_factory.mktemp("export-run")
    env = write_stage_env(root, 1, tiny_model_dir, root / "stage1", small_dataset)
    config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--report_to=none", "--validation_disable",
                             "--checkpoint_step_interval=2", "--use_ema", "--export_ema",
                             "--export_format=diffusers,single_file", "--export_precision=fp16"])
    return train(config).output_dir


def test_training_writes_the_single_file_and_workflow(finished_run: Path) -> None:
    folder = finished_run / SINGLE_FILE_DIR
    checkpoint = folder / "stage1-t350-999.safetensors"
    with safe_open(str(checkpoint), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert handle.metadata()["modelspec.timestep_range"] == "350,999"
    assert {"v_pred", "ztsnr"} <= keys  # the recipe trains v-prediction with zero-terminal SNR
    assert checkpoint.with_suffix(".yaml").is_file()
    workflow = json.loads((folder / WORKFLOW_FILE).read_text())
    loaders = [n for n in workflow.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert [n["inputs"]["ckpt_name"] for n in loaders] == [checkpoint.name]


def test_a_checkpoint_exports_as_the_run_exported_it(finished_run: Path, tmp_path: Path) -> None:
    """checkpoint-3 is the final step: its export (EMA weights, band, parameterisation) is the run's own pipeline."""
    out = tmp_path / "out"
    written = export_run(finished_run / "checkpoints" / "checkpoint-3", out, ("diffusers", "single_file"))
    assert {p.name for p in written} == {"pipeline", SINGLE_FILE_DIR, EXPORT_FILE}
    ours, theirs = load_file(out / "pipeline" / UNET_FILE), load_file(finished_run / "pipeline" / UNET_FILE)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "pipeline" / "expert.json").read_text()) == \
        json.loads((finished_run / "pipeline" / "expert.json").read_text())
    scheduler = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    with safe_open(str(out / SINGLE_FILE_DIR / "stage1-t350-999.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float32

    earlier = export_run(finished_run / "checkpoints" / "checkpoint-2", out)  # its own export: replaced
    assert {p.name for p in earlier} == {"pipeline", EXPORT_FILE}
    assert not torch.equal(load_file(out / "pipeline" / UNET_FILE)["conv_out.weight"], ours["conv_out.weight"])


def test_precision_applies_to_the_diffusers_folders_too(finished_run: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "fp16"
    export_run(finished_run / "checkpoints" / "checkpoint-3", out, ("diffusers",), "fp16")
    half, full = load_file(out / "pipeline" / UNET_FILE), load_file(finished_run / "pipeline" / UNET_FILE)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], full[k].half()) for k in full)
    assert (out / "pipeline" / "expert.json").read_text() == (finished_run / "pipeline" / "expert.json").read_text()
    loaded = StableDiffusionXLPipeline.from_pretrained(str(out / "pipeline"), dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_never_overwrites_user_files(finished_run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an expertune export"):
        export_run(finished_run, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    with pytest.raises(ConfigError, match="inside"):
        export_run(finished_run / "checkpoints" / "checkpoint-3", finished_run / "checkpoints" / "checkpoint-3" / "x")


def test_cli_export_of_a_finished_output_dir(finished_run: Path, tmp_path: Path, capsys) -> None:
    """A finished run's output directory exports its experts ("final"); bad input is one error line, exit 2."""
    out = tmp_path / "final"
    assert main(["export", str(finished_run), "--out", str(out), "--export_format", "single_file"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_FILE, SINGLE_FILE_DIR]
    assert json.loads((out / EXPORT_FILE).read_text())["kind"] == "tree"
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "expertune: error: export:" in capsys.readouterr().err
    assert main(["export", str(finished_run), "--out", str(tmp_path / "x"), "--export_format", "onnx"]) == 2


def test_generate_reads_a_checkpoint_as_an_expert(finished_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`generate --expert checkpoint-2` exports it into a scratch folder and samples it; the run is untouched. The
    low band is the untouched base model under the same parameterisation."""
    import shutil

    from PIL import Image

    from expertune.expert_format import ExpertDescription
    from expertune.experts import ExpertBand

    low = tmp_path / "low"
    shutil.copytree(tiny_model_dir, low)
    shutil.rmtree(low / "scheduler")
    shutil.copytree(finished_run / "pipeline" / "scheduler", low / "scheduler")
    stage1 = ExpertDescription.read(finished_run / "pipeline")
    ExpertDescription(ExpertBand(0, 349, 1000), stage1.parameterisation).write(low)
    before = sorted(p.relative_to(finished_run) for p in finished_run.rglob("*"))
    out = tmp_path / "sample.png"
    assert main(["generate", "--expert", str(finished_run / "checkpoints" / "checkpoint-2"), "--expert", str(low),
                 "--prompt", "a red circle", "--steps", "3", "--height", "64", "--width", "64", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert sorted(p.relative_to(finished_run) for p in finished_run.rglob("*")) == before
