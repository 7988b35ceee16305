"""What a run validates with: prompt library, explicit inputs, and the peer-expert guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from expertune.config import Config
from expertune.errors import ConfigError, ModelError
from expertune.expert_format import expert_summary
from expertune.experts import ExpertBand
from expertune.schedule import NoiseSchedule
from expertune.validate.plan import ValidationPrompt, build_plan, find_validation_inputs, load_prompt_library

V_ZSNR = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
STAGE_1, STAGE_2 = ExpertBand(350, 999), ExpertBand(0, 349)


def _expert_dir(folder: Path, band: ExpertBand, schedule: NoiseSchedule = V_ZSNR, **changes) -> Path:
    """A directory holding only expert.json: all the guard reads."""
    folder.mkdir(parents=True)
    description = {**expert_summary(band, schedule.describe()), **changes}
    (folder / "expert.json").write_text(json.dumps(description))
    return folder


def _config(**values) -> Config:
    return Config.from_flat(values)


def test_prompt_library_json_object(tmp_path: Path) -> None:
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"astronaut": "an astronaut riding a horse", "cat-2": " a cat "}))
    assert load_prompt_library(library) == [ValidationPrompt("astronaut", "an astronaut riding a horse"),
                                            ValidationPrompt("cat-2", "a cat")]
    for bad, message in [(["a"], "JSON object"), ({"a b": "x"}, "name 'a b'"), ({"a": ""}, "non-empty"), ({}, "no prompt")]:
        library.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            load_prompt_library(library)
    library.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_prompt_library(library)
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompt_library(tmp_path / "missing.json")


def test_prompt_library_one_prompt_per_line(tmp_path: Path) -> None:
    library = tmp_path / "prompts.txt"
    library.write_text("# my prompts\na red circle\n\n  a blue square  \n")
    assert load_prompt_library(library) == [ValidationPrompt("line_02", "a red circle"),
                                            ValidationPrompt("line_04", "a blue square")]


def test_validation_inputs_from_a_file_or_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("b photo.png", "a.jpg"):
        Image.new("RGB", (40, 30), "red").save(folder / name)
    (folder / "a.txt").write_text("a red field\n")
    (folder / "notes.md").write_text("not an image")
    found = find_validation_inputs(folder, "fallback prompt")
    assert [(i.path.name, i.name, i.prompt) for i in found] == [
        ("a.jpg", "a", "a red field"), ("b photo.png", "b_photo", "fallback prompt")]
    assert [i.name for i in find_validation_inputs(folder / "a.jpg", None)] == ["a"]
    assert find_validation_inputs(folder / "b photo.png", None)[0].prompt == ""
    for bad, message in [(tmp_path / "nope", "does not exist"), (folder / "notes.md", "not an image")]:
        with pytest.raises(ConfigError, match=message):
            find_validation_inputs(bad, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image"):
        find_validation_inputs(tmp_path / "empty", None)


def test_plan_collects_every_prompt_to_cache(tmp_path: Path) -> None:
    library = tmp_path / "prompts.txt"
    library.write_text("a red circle\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "input.png")
    plan = build_plan(_config(validation_prompt="a cat", validation_prompt_library=str(library),
                              validation_negative_prompt="blurry", validation_input=str(tmp_path / "input.png")),
                      STAGE_2, V_ZSNR, tmp_path / "out")
    assert [p.name for p in plan.prompts] == ["prompt", "line_01"]
    assert plan.prompts_to_cache == ["a cat", "a red circle", "blurry"]  # the input falls back to the prompt
    assert plan.peer is None and plan.clip is None
    assert build_plan(_config(validation_disable=True, validation_prompt="x"), STAGE_2, V_ZSNR, tmp_path).prompts == []
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"prompt": "y"}))
    with pytest.raises(ConfigError, match="names a prompt 'prompt'"):
        build_plan(_config(validation_prompt="x", validation_prompt_library=str(clash)), STAGE_2, V_ZSNR, tmp_path)


def test_stage_1_refuses_explicit_input_images(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "input.png")
    with pytest.raises(ConfigError, match=r"validation_input=.*band \[350, 999\] starts from pure noise"):
        build_plan(_config(validation_input=str(tmp_path / "input.png")), STAGE_1, V_ZSNR, tmp_path / "out")


def test_peer_guard_accepts_the_complementary_expert(tmp_path: Path) -> None:
    peer = _expert_dir(tmp_path / "stage2" / "pipeline", STAGE_2)
    plan = build_plan(_config(validation_peer_expert=str(tmp_path / "stage2")), STAGE_1, V_ZSNR, tmp_path / "out")
    assert plan.peer is not None and plan.peer.path == peer
    assert [e.band for e in plan.chain] == [STAGE_1, STAGE_2]
    assert plan.chain[0].name == f"this run ({tmp_path / 'out'})"


@pytest.mark.parametrize("peer_band, changes, message", [
    (STAGE_2, {"prediction_type": "epsilon"}, r"prediction_type: this run .* has 'v_prediction', .* has 'epsilon'"),
    (STAGE_2, {"rescale_betas_zero_snr": False}, r"rescale_betas_zero_snr: this run .* has True, .* has False"),
    (STAGE_2, {"timestep_spacing": "leading"}, r"timestep_spacing: this run .* has 'trailing', .* has 'leading'"),
    (STAGE_2, {"num_train_timesteps": 2000}, r"num_train_timesteps: this run .* has 1000, .* has 2000"),
    (ExpertBand(0, 299), {}, r"bands \[0, 299\] and \[350, 999\] leave a gap \[300, 349\]"),
    (ExpertBand(0, 400), {}, r"bands \[0, 400\] and \[350, 999\] overlap"),
])
def test_peer_guard_refuses_a_mismatched_peer(tmp_path: Path, peer_band, changes, message) -> None:
    _expert_dir(tmp_path / "peer", peer_band, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        build_plan(_config(validation_peer_expert=str(tmp_path / "peer")), STAGE_1, V_ZSNR, tmp_path / "out")
    assert str(tmp_path / "peer") in str(info.value) and "this run" in str(info.value)
    assert info.value.exit_code == 2


def test_peer_guard_refuses_what_is_not_an_expert(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="not an expertune expert"):
        build_plan(_config(validation_peer_expert=str(tmp_path / "plain")), STAGE_1, V_ZSNR, tmp_path / "out")


def test_clip_model_that_cannot_load_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="pretrained_evaluation_model_name_or_path=.*cannot load a CLIP model"):
        build_plan(_config(evaluation_type="clip", pretrained_evaluation_model_name_or_path=str(tmp_path / "none")),
                   STAGE_1, V_ZSNR, tmp_path / "out")


def test_a_band_no_inference_step_reaches_is_refused_before_training(tmp_path: Path) -> None:
    narrow = ExpertBand(500, 510)  # 20 trailing steps: ..., 549, 499, ...: none inside
    with pytest.raises(ConfigError, match=r"none of the 20 trailing inference timesteps falls in its band.*"
                                          r"--validation_num_inference_steps=\d+ or more"):
        build_plan(_config(validation_num_inference_steps=20), narrow, V_ZSNR, tmp_path)
    assert build_plan(_config(validation_num_inference_steps=20, validation_disable=True), narrow, V_ZSNR, tmp_path)
    assert build_plan(_config(validation_num_inference_steps=100), narrow, V_ZSNR, tmp_path) is not None
    assert build_plan(_config(validation_num_inference_steps=4), STAGE_2, V_ZSNR, tmp_path) is not None
