"""`make demo`'s code path at a few steps: both experts trained from the world base, validated, chained, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertune.cli import main

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    bands = [json.loads((out / f"stage{n}" / "pipeline" / "expert.json").read_text())["timestep_range"]
             for n in (1, 2)]
    assert bands == [[350, 999], [0, 349]]
    stage2 = json.loads((out / "stage2" / "run.json").read_text())
    assert stage2["cache"]["latents_encoded"] == 0 and stage2["cache"]["embeds_encoded"] == 0
    assert stage2["cache"]["latents_reused"] > 100
    assert (out / "sample.png").stat().st_size > 0
    from PIL import Image

    from expertune.demo.run import palette_prompts
    from expertune.world.scene import HELD_OUT

    # The before/after grid: the base chained with itself over the trained experts, one column per held-out prompt.
    assert Image.open(out / "before_after.png").size[0] == 64 * len(HELD_OUT)
    assert len(palette_prompts()) == 56 and Image.open(out / "palette.png").size == (7 * 64, 8 * 64)
    singles = sorted((out / "samples" / "after").glob("*.png"))
    assert len(singles) == 2 * len(HELD_OUT) and singles[0].name == f"00_{HELD_OUT[0].caption.replace(' ', '_')}.png"
    assert len(list((out / "samples" / "palette").glob("*.png"))) == 56
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"clip", "colour/shape", "colour/background", "colour/both"} <= set(report["held_out_prompts"][side])
    # Validation begins at step 0, so each expert's per-band held-out loss shows its change.
    for stage in ("stage1", "stage2"):
        assert report[stage]["step_0"]["step"] == 0 and report[stage]["final"]["step"] == 2
        assert report[stage]["step_0"]["eval/loss"] > 0
    assert list((out / "stage1" / "validation").rglob("text_to_image_*.png"))
    page = (out / "report_stage2.html").read_text()  # the run page, images inlined, nothing fetched
    assert "data:image/jpeg;base64," in page and 'src="http' not in page and "/static/" not in page
    assert list((out / "stage2" / "validation").rglob("partial_denoise_*.png"))
    assert list((out / "stage2" / "validation").rglob("chain_*.png"))  # through the stage 1 expert
    # The demo's TensorBoard event files hold the validation images and every scalar.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage, lo in (("stage1", 350), ("stage2", 0)):
        scalars, images = set(), set()
        for event_file in (out / stage / "logs").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0}).Reload()
            scalars |= set(acc.Tags()["scalars"])
            images |= set(acc.Tags()["images"])
        assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "clip/mean"} <= scalars, stage
        assert any(s.startswith(f"eval/loss_{lo}_") for s in scalars) and images, stage
    # The demo trains from the recipe's own config.env files, which it leaves for the user to read.
    assert "--refiner_training_invert_schedule" in (out / "stage1.env").read_text()
    # A second run replaces the first (the demo owns its folder) and encodes nothing new.
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 0
    stage1 = json.loads((out / "stage1" / "run.json").read_text())
    assert stage1["cache"]["latents_encoded"] == 0 and stage1["steps"] == 1
