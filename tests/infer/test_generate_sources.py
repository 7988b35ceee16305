"""generate's inputs: --base (the untouched model), hub ids from the local cache only, prompt files in one load,
model CPU offload and diffusers' progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expertune.cli import main
from expertune.errors import ConfigError, ModelError
from expertune.infer import chain
from expertune.infer.generate import load_chain, run_chain
from expertune.infer.sources import base_expert, local_model, read_prompts

SMALL = ["--steps", "3", "--height", "64", "--width", "64", "--device", "cpu"]


def test_prompt_files_lines_and_simpletuner_library(tmp_path: Path) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle\n\n# a comment\na blue square\n")
    assert read_prompts(lines) == {"prompt_000": "a red circle", "prompt_001": "a blue square"}
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"red one": "a red circle", "sq/uare": "a blue square"}))
    assert read_prompts(library) == {"red_one": "a red circle", "sq_uare": "a blue square"}
    for name, text, match in (("empty.txt", "\n# only a comment\n", "holds no prompt"),
                              ("list.json", "[1, 2]", "not valid JSON|JSON object"),
                              ("blank.json", '{"a": ""}', "JSON object")):
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            read_prompts(bad)


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        local_model("nobody/not-a-cached-model")
    with pytest.raises(ModelError, match="neither a local folder"):
        local_model("./no/such/model")


def test_base_model_alone_is_a_one_expert_chain(tiny_model_dir: Path) -> None:
    expert = base_expert(str(tiny_model_dir))
    assert (expert.band.lo, expert.band.hi) == (0, 999) and expert.description["prediction_type"] == "epsilon"
    assert expert.name == f"base model {tiny_model_dir}"


def test_cpu_offload_installs_diffusers_hooks_and_changes_nothing(tiny_model_dir: Path) -> None:
    expert = base_expert(str(tiny_model_dir))
    plain = run_chain(load_chain([expert], device="cpu"), "a red circle", num_inference_steps=2, height=64, width=64)
    offloaded = load_chain([expert], device="cpu", cpu_offload=True)
    assert hasattr(offloaded.stages[0].components["unet"], "_hf_hook")
    images = run_chain(offloaded, "a red circle", num_inference_steps=2, height=64, width=64)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(images[0]))


def test_cli_base_with_a_prompt_library_loads_once(tiny_model_dir: Path, tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real = chain._PipelineLoader._pipeline

    def counting(self, source):
        loads.append(str(source))
        return real(self, source)

    monkeypatch.setattr(chain._PipelineLoader, "_pipeline", counting)
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"red": "a red circle", "blue": "a blue square"}))
    out = tmp_path / "images" / "grid.png"
    assert main(["generate", "--base", str(tiny_model_dir), "--prompts", str(library), *SMALL, "--out", str(out)]) == 0
    assert loads == [str(tiny_model_dir)]
    written = sorted(p.name for p in (tmp_path / "images" / "grid").iterdir())
    assert written == ["blue.png", "red.png"]
    assert Image.open(tmp_path / "images" / "grid" / "red.png").size == (64, 64)
    assert "3/3" in capsys.readouterr().err  # diffusers' progress bar is on


def test_cli_generate_refuses_ambiguous_inputs(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "--prompt", "x", *SMALL]) == 2
    assert main(["generate", "--base", str(tiny_model_dir), "--expert", str(tmp_path), "--prompt", "x"]) == 2
    assert main(["generate", "--base", str(tiny_model_dir), *SMALL]) == 2
    assert capsys.readouterr().err.count("expertune: error:") == 3
