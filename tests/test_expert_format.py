"""expert.json and mixture.json: written and read in one place (src/expertune/expert_format.py).

The documents are pinned whole (every key and value), and every refusal by its whole message, so a renamed key, a
lost default or a reworded fix shows up here and not in a user's chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertune.errors import ModelError
from expertune.expert_format import (
    EXPERT_FILE,
    MIXTURE_FILE,
    ExpertDescription,
    MixtureDescription,
    MixtureMember,
    check_format_version,
    expert_summary,
)
from expertune.experts import ExpertBand

PARAMS = {"num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


def test_an_expert_document_holds_its_band_both_ways_its_parameterisation_and_what_was_saved() -> None:
    lora = ExpertDescription(ExpertBand(0, 349), PARAMS, "lora", "base/model", "ema")
    assert lora.to_json() == {"format_version": 1, "timestep_range": [0, 349], "denoising_start": 0.65,
                              "denoising_end": None, **PARAMS, "model_type": "lora", "weights": "ema",
                              "base_model": "base/model"}
    full = ExpertDescription(ExpertBand(350, 999), PARAMS)
    assert full.to_json() == {"format_version": 1, "timestep_range": [350, 999], "denoising_start": None,
                              "denoising_end": 0.65, **PARAMS, "model_type": "full", "weights": "trained"}


def test_an_expert_reads_back_what_it_wrote(tmp_path: Path) -> None:
    for description in (ExpertDescription(ExpertBand(0, 349), PARAMS, "lora", "base/model", "ema"),
                        ExpertDescription(ExpertBand(350, 999), PARAMS)):
        path = description.write(tmp_path)
        assert path == tmp_path / EXPERT_FILE
        assert json.loads(path.read_text(encoding="utf-8")) == description.to_json()
        assert ExpertDescription.read(tmp_path) == description
        assert ExpertDescription.read(str(tmp_path)) == description


def test_an_expert_written_before_its_own_keys_existed_reads_with_their_defaults() -> None:
    read = ExpertDescription.from_json({"format_version": 1, "timestep_range": [3, 9], "num_train_timesteps": 10,
                                        "denoising_start": 0.0, "denoising_end": 0.7, "beta_end": 0.012})
    assert read == ExpertDescription(ExpertBand(3, 9, 10), {"num_train_timesteps": 10, "beta_end": 0.012},
                                     "full", None, "trained")
    with_base = ExpertDescription.from_json({"format_version": 1, "timestep_range": ["3", "9"],
                                             "num_train_timesteps": "10", "base_model": 7})
    assert with_base.band == ExpertBand(3, 9, 10) and with_base.base_model == "7"


@pytest.mark.parametrize(("version", "fix"), [(2, "upgrade expertune to read it"),
                                              (0, "train it again with this expertune"),
                                              (None, "train it again with this expertune"),
                                              ("2", "train it again with this expertune")])
def test_another_format_version_is_refused_naming_both_versions_and_the_fix(version: object, fix: str) -> None:
    with pytest.raises(ModelError) as caught:
        check_format_version(version, 1, "x.json is an expert")
    assert str(caught.value) == f"x.json is an expert of format_version {version!r}; this expertune reads " \
                                f"format_version 1: {fix}"
    check_format_version(3, 3, "x.json is an expert")  # its own version passes
    document = {"format_version": version, "timestep_range": [0, 9], "num_train_timesteps": 10}
    with pytest.raises(ModelError, match=r"^e\.json is an expert of format_version"):
        ExpertDescription.from_json(document, "e.json")
    with pytest.raises(ModelError, match=r"^expert\.json is an expert of format_version"):
        ExpertDescription.from_json(document)


@pytest.mark.parametrize(("document", "error"), [
    ({"format_version": 1, "num_train_timesteps": 10}, "'timestep_range'"),
    ({"format_version": 1, "timestep_range": [0, 9]}, "'num_train_timesteps'"),
    ({"format_version": 1, "timestep_range": 5, "num_train_timesteps": 10}, "cannot unpack non-iterable int object"),
    ({"format_version": 1, "timestep_range": [0, 10], "num_train_timesteps": 10},
     "expert band [0, 10] must satisfy 0 <= lo <= hi <= 9 (num_train_timesteps=10)"),
])
def test_a_broken_expert_document_is_refused_naming_the_file(document: dict, error: str) -> None:
    with pytest.raises(ModelError) as caught:
        ExpertDescription.from_json(document, "e.json")
    assert str(caught.value) == f"e.json is not a valid expert description: {error}"


def test_an_unknown_model_type_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ModelError) as caught:
        ExpertDescription.from_json({"format_version": 1, "timestep_range": [0, 9], "num_train_timesteps": 10,
                                     "model_type": "dora"}, "e.json")
    assert str(caught.value) == "e.json: model_type 'dora' is not one of full, lora"


def test_reading_a_folder_without_a_valid_expert_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        ExpertDescription.read(tmp_path)
    assert str(caught.value) == f"{tmp_path} is not an expertune expert: {tmp_path / EXPERT_FILE} is missing"
    (tmp_path / EXPERT_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        ExpertDescription.read(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / EXPERT_FILE} is not a valid expert description: Expecting")
    (tmp_path / EXPERT_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        ExpertDescription.read(tmp_path)
    assert str(caught.value) == f"{tmp_path / EXPERT_FILE} is not a valid expert description: not a JSON object"
    (tmp_path / EXPERT_FILE).write_text('{"format_version": 1, "timestep_range": [0, 9], "num_train_timesteps": 10, '
                                        '"model_type": "x", "note": "é"}', encoding="utf-8")
    with pytest.raises(ModelError) as caught:  # the file's own path names it, not the bare file name
        ExpertDescription.read(tmp_path)
    assert str(caught.value) == f"{tmp_path / EXPERT_FILE}: model_type 'x' is not one of full, lora"


def test_expert_summary_is_the_band_and_parameterisation_part_of_expert_json() -> None:
    assert expert_summary(ExpertBand(0, 349), PARAMS) == {
        "format_version": 1, "timestep_range": [0, 349], "denoising_start": 0.65, "denoising_end": None, **PARAMS}
    description = ExpertDescription(ExpertBand(350, 999), PARAMS)
    document = description.to_json()
    assert expert_summary(description.band, PARAMS) == {k: v for k, v in document.items()
                                                        if k not in ("model_type", "weights")}


MEMBERS = (MixtureMember("expert-0/pipeline", ExpertBand(350, 999)),
           MixtureMember("expert-1/pipeline", ExpertBand(0, 349), "lora"))


def _write_mixture(root: Path, members: tuple[MixtureMember, ...] = MEMBERS, own: list[ExpertBand] | None = None,
                   params: dict | None = None) -> MixtureDescription:
    mixture = MixtureDescription(members, PARAMS if params is None else params)
    for member, band in zip(members, own or [m.band for m in members]):
        (root / member.path).mkdir(parents=True, exist_ok=True)
        own_params = PARAMS if params is None or "num_train_timesteps" not in params else params
        ExpertDescription(band, own_params, member.model_type).write(root / member.path)
    assert mixture.write(root) == root / MIXTURE_FILE
    return mixture


def test_a_mixture_document_lists_its_experts_in_chain_order_and_reads_back(tmp_path: Path) -> None:
    mixture = _write_mixture(tmp_path)
    assert json.loads((tmp_path / MIXTURE_FILE).read_text(encoding="utf-8")) == {
        "format_version": 1, **PARAMS,
        "experts": [{"path": "expert-0/pipeline", "timestep_range": [350, 999], "denoising_start": None,
                     "denoising_end": 0.65, "model_type": "full"},
                    {"path": "expert-1/pipeline", "timestep_range": [0, 349], "denoising_start": 0.65,
                     "denoising_end": None, "model_type": "lora"}]}
    assert MixtureDescription.read(tmp_path) == mixture
    assert MixtureDescription.read(str(tmp_path)).parameterisation == PARAMS
    assert mixture.expert_dirs(tmp_path) == [tmp_path / "expert-0/pipeline", tmp_path / "expert-1/pipeline"]
    assert mixture.expert_dirs(str(tmp_path)) == mixture.expert_dirs(tmp_path)


def test_a_mixture_member_without_a_model_type_is_a_full_model(tmp_path: Path) -> None:
    _write_mixture(tmp_path)
    document = json.loads((tmp_path / MIXTURE_FILE).read_text(encoding="utf-8"))
    for entry in document["experts"]:
        del entry["model_type"]
    (tmp_path / MIXTURE_FILE).write_text(json.dumps(document), encoding="utf-8")
    assert [m.model_type for m in MixtureDescription.read(tmp_path).experts] == ["full", "full"]


def _rewrite(root: Path, change: dict) -> Path:
    path = root / MIXTURE_FILE
    document = json.loads(path.read_text(encoding="utf-8"))
    document.update(change)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_reading_a_folder_without_a_mixture_points_at_expert(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == (f"{tmp_path} is not an expertune mixture: {tmp_path / MIXTURE_FILE} is missing (a "
                                 "single expert has expert.json instead: pass it with --expert)")
    (tmp_path / MIXTURE_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / MIXTURE_FILE} is not a valid mixture description: Expecting")


@pytest.mark.parametrize(("document", "version"), [({"format_version": 2}, 2), ({}, None), ([1], None)])
def test_a_mixture_of_another_format_version_is_refused(tmp_path: Path, document: object, version: object) -> None:
    (tmp_path / MIXTURE_FILE).write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    fix = "upgrade expertune to read it" if version == 2 else "train it again with this expertune"
    assert str(caught.value) == (f"{tmp_path / MIXTURE_FILE} is a mixture of format_version {version!r}; this "
                                 f"expertune reads format_version 1: {fix}")


@pytest.mark.parametrize(("change", "error"), [
    ({"num_train_timesteps": None}, "int() argument must be a string, a bytes-like object or a real number, not "
                                    "'NoneType'"),
    ({"experts": [{"timestep_range": [0, 999]}]}, "'path'"),
    ({"experts": [{"path": "a"}]}, "'timestep_range'"),
    ({"experts": [{"path": "a", "timestep_range": [0]}]}, "list index out of range"),
    ({"experts": [{"path": "a", "timestep_range": [0, 1000]}]},
     "expert band [0, 1000] must satisfy 0 <= lo <= hi <= 999 (num_train_timesteps=1000)"),
])
def test_a_broken_mixture_document_is_refused_naming_the_file(tmp_path: Path, change: dict, error: str) -> None:
    _write_mixture(tmp_path)
    path = _rewrite(tmp_path, change)
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == f"{path} is not a valid mixture description: {error}"


def test_a_mixture_without_num_train_timesteps_is_refused(tmp_path: Path) -> None:
    _write_mixture(tmp_path, params={})
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == f"{tmp_path / MIXTURE_FILE} is not a valid mixture description: 'num_train_timesteps'"


def test_a_mixture_whose_bands_do_not_tile_in_chain_order_is_refused(tmp_path: Path) -> None:
    _write_mixture(tmp_path)
    path = _rewrite(tmp_path, {"experts": []})
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == f"{path} lists no experts"
    reversed_order = [m.to_json() for m in reversed(MEMBERS)]
    _rewrite(tmp_path, {"experts": reversed_order})
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == f"{path}: experts are not listed in chain order (highest noise first)"
    gap = [MixtureMember("a", ExpertBand(400, 999)).to_json(), MixtureMember("b", ExpertBand(0, 349)).to_json()]
    _rewrite(tmp_path, {"experts": gap})
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == f"{path}: bands [0, 349] and [400, 999] leave a gap [350, 399]"


def test_a_mixture_whose_expert_owns_another_band_by_its_own_expert_json_is_refused(tmp_path: Path) -> None:
    _write_mixture(tmp_path, own=[ExpertBand(350, 999), ExpertBand(0, 350)])
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == (f"{tmp_path / MIXTURE_FILE}: expert expert-1/pipeline owns [0, 350] by its "
                                 "expert.json, but the mixture lists [0, 349]")
    (tmp_path / "expert-1/pipeline" / EXPERT_FILE).unlink()
    with pytest.raises(ModelError, match="is not an expertune expert"):
        MixtureDescription.read(tmp_path)


def test_a_mixture_names_every_problem_of_its_bands_and_keeps_its_schedule_length(tmp_path: Path) -> None:
    short = (MixtureMember("a", ExpertBand(5, 9, 10)), MixtureMember("b", ExpertBand(0, 4, 10)))
    mixture = _write_mixture(tmp_path, short, params={"num_train_timesteps": 10})
    assert MixtureDescription.read(tmp_path) == mixture
    path = _rewrite(tmp_path, {"experts": [MixtureMember("a", ExpertBand(5, 8, 10)).to_json(),
                                           MixtureMember("b", ExpertBand(1, 4, 10)).to_json()]})
    with pytest.raises(ModelError) as caught:
        MixtureDescription.read(tmp_path)
    assert str(caught.value) == (f"{path}: no expert holds t = 9 (highest band is [5, 8]); no expert holds t = 0 "
                                 "(lowest band is [1, 4])")


def test_the_base_revision_and_variant_round_trip_and_are_left_out_when_unset() -> None:
    from expertune.expert_format import ExpertDescription
    from expertune.experts import ExpertBand

    band = ExpertBand(0, 349, 1000)
    plain = ExpertDescription(band, {"num_train_timesteps": 1000}, model_type="lora", base_model="org/model")
    assert "base_revision" not in plain.to_json() and "base_variant" not in plain.to_json()
    pinned = ExpertDescription(band, {"num_train_timesteps": 1000}, model_type="lora", base_model="org/model",
                               base_revision="v1.0", base_variant="fp16")
    document = pinned.to_json()
    assert (document["base_revision"], document["base_variant"]) == ("v1.0", "fp16")
    assert ExpertDescription.from_json(document) == pinned
    assert ExpertDescription.from_json(plain.to_json()) == plain
