"""A blended hand-off (`--handoff_blend`, infer/handoff.py): the weights, the refusals, and the chain equal to the
plain-diffusers code of docs/mixtures.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.infer.handoff import blend_weights, check_window

DOCS = Path(__file__).resolve().parents[2] / "docs" / "mixtures.md"
BANDS = [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]


def test_the_weights_cross_fade_linearly_across_each_window_and_nowhere_else() -> None:
    assert blend_weights(349.5, BANDS, 100, own=1) == {1: 0.5, 2: 0.5}  # at the boundary: half each
    assert blend_weights(380, BANDS, 100, own=1) == pytest.approx({1: 0.805, 2: 0.195})
    assert blend_weights(320, BANDS, 100, own=2) == pytest.approx({1: 0.205, 2: 0.795})
    assert blend_weights(699.5 + 49, BANDS, 100, own=0) == pytest.approx({0: 0.99, 1: 0.01})
    assert blend_weights(500, BANDS, 100, own=1) == {1: 1.0}  # outside every window: the stage's own expert
    assert blend_weights(400, BANDS, 100, own=1) == {1: 1.0}  # (the window is 299.5 < t < 399.5)
    assert blend_weights(349.5, BANDS, 0, own=2) == {2: 1.0}  # no window: the hard hand-off


def test_a_window_must_be_shorter_than_every_band() -> None:
    check_window(299, BANDS)
    with pytest.raises(ConfigError, match=r"--handoff_blend 300 is not shorter than the band \[700, 999\].*below 300"):
        check_window(300, BANDS)
    with pytest.raises(ConfigError, match=r"--handoff_blend -1: give a window of timesteps >= 0"):
        check_window(-1, BANDS)


@pytest.mark.integration
def test_generate_with_a_blend_is_the_documented_plain_diffusers_chain(trained_experts, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from expertune.expert_format import MixtureDescription, MixtureMember
    from expertune.infer.chain import mixture_expert_paths, read_expert
    from expertune.infer.generate import generate_images
    from PIL import Image

    experts = [read_expert(result.output_dir) for result in trained_experts]
    root = tmp_path / "mixture"
    root.mkdir()
    members = tuple(MixtureMember(str(e.path), e.band) for e in experts)  # absolute paths: os.path.join keeps them
    MixtureDescription(members, {k: experts[0].description[k] for k in ("num_train_timesteps",)}).write(root)
    paths = mixture_expert_paths(root)
    options = dict(num_inference_steps=16, seed=0, guidance_scale=5.0, device="cpu")
    hard = generate_images(paths, "a red circle on a blue background", **options)[0]
    blended = generate_images(paths, "a red circle on a blue background", handoff_blend=300, **options)[0]
    assert list(generate_images(paths, "a red circle on a blue background", handoff_blend=0, **options)[0].getdata()) \
        == list(hard.getdata())
    assert list(blended.getdata()) != list(hard.getdata())  # the window mixes in the neighbour
    code = re.search(r"### A blended hand-off in plain diffusers.*?```python\n(.*?)```", DOCS.read_text(), re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    source = code.group(1).replace('"OUTPUT_DIR"', repr(str(root)))
    assert 'background", 30' in source
    exec(compile(source.replace('background", 30', 'background", 16'), "docs/mixtures.md", "exec"), {})  # 16 steps
    assert list(Image.open(tmp_path / "mixture_blend.png").getdata()) == list(blended.getdata())


@pytest.mark.integration
def test_a_mixture_blends_its_validation_chain_and_generate_takes_the_window_from_mixture_json(
        tiny_model_dir: Path, small_dataset: Path, tmp_path: Path) -> None:
    import json

    from helpers import FAST_FLAGS
    from PIL import Image

    from expertune.cli import main
    from expertune.config import load_config
    from expertune.infer.chain import mixture_expert_paths
    from expertune.infer.generate import generate_images
    from expertune.train.loop import train

    chains = {}
    for blend in (0, 300):
        output = tmp_path / f"blend{blend}"
        config, _ = load_config([*FAST_FLAGS, "--report_to=none", "--train_batch_size=2", "--max_train_steps=1",
                                 f"--pretrained_model_name_or_path={tiny_model_dir}",
                                 f"--data_backend_config={small_dataset}", f"--output_dir={output}",
                                 "--mixture_boundaries=350", f"--mixture_handoff_blend={blend}",
                                 "--validation_num_inference_steps=10"])
        train(config)
        chains[blend] = list(Image.open(output / "validation" / "step_000001" / "expert_0" / "chain_prompt.png").getdata())
    assert chains[0] != chains[300]  # the same experts (the blend changes no training): the chain differs by the blend
    mixture = tmp_path / "blend300"
    assert json.loads((mixture / "mixture.json").read_text())["handoff_blend"] == 300
    assert "handoff_blend" not in json.loads((tmp_path / "blend0" / "mixture.json").read_text())
    out = tmp_path / "generated.png"
    assert main(["generate", "--mixture", str(mixture), "--prompt", "a red circle", "--steps", "12", "--guidance", "5",
                 "--device", "cpu", "--dtype", "fp32", "--height", "64", "--width", "64", "--out", str(out)]) == 0
    expected = generate_images(mixture_expert_paths(mixture), "a red circle", num_inference_steps=12, guidance_scale=5.0,
                               device="cpu", height=64, width=64, handoff_blend=300)[0]
    assert list(Image.open(out).getdata()) == list(expected.getdata())
