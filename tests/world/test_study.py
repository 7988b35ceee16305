"""bench/expert_study.py: equal compute per arm, honest summaries, and one real (tiny) task end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

STUDY_FILE = Path(__file__).resolve().parents[2] / "bench" / "expert_study.py"
spec = importlib.util.spec_from_file_location("expert_study", STUDY_FILE)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """run_task sets one thread for its worker process; here it runs in the test process: restore the count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("steps", [40, 800, 801])
def test_every_arm_spends_the_same_steps_and_tiles_the_schedule(steps: int) -> None:
    for arm in study.ARMS:
        runs = study.plan(arm, steps)
        assert sum(r[2] for r in runs) == steps, arm
        final = [r for r in runs if r[0] != "shared"]
        bands = [b for _, band, _, _ in final for b in _bands(band)]
        covered = sorted(t for band in bands for t in range(band[0], band[1] + 1))
        assert covered == list(range(1000)), arm
    stage1, stage2 = study.plan("two_experts", 800)
    assert (stage1[1], stage1[2], stage2[1], stage2[2]) == ((350, 999), 520, (0, 349), 280)
    shared, *experts = study.plan("branching", 800)
    assert shared[2] == 400 and all(start == "shared" for *_, start in experts)
    assert [(lo, hi) for lo, hi in _bands(study.plan("three_experts", 800)[0][1])] == [(700, 999), (350, 699), (0, 349)]


def _bands(band) -> list[tuple[int, int]]:
    """A run's band, or each expert's band of a mixture plan, on the world's (SDXL) schedule."""
    if not isinstance(band, str):
        return [band]
    from expertune.mixture import plan_bands
    from expertune.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000})
    return [(b.lo, b.hi) for b in plan_bands(band, schedule.alphas_cumprod)]


def test_summary_is_mean_and_sample_spread_over_seeds() -> None:
    rows = [{"arm": "one_model", "seed": s, "eval/loss_0_349": v, "eval/loss": v, "clip": 10.0 * s,
             "held_out/colour/both": 0.5, "seen/colour/both": 0.5, "colour/shape": 1.0, "colour/background": 1.0}
            for s, v in enumerate([1.0, 2.0, 3.0])]
    summary = study.summarise(rows)
    assert summary["one_model"]["eval/loss"] == (2.0, 1.0)
    assert summary["one_model"]["clip"] == (10.0, 10.0)
    table = study.markdown_table(summary, seeds=3, steps=800)
    assert "| loss 0–349 | 2.0000 ± 1.0000 |" in table and "| clip | 10.0 ± 10.0 |" in table


def _world_dataloader(folder: Path) -> Path:
    """A dataloader JSON over one image of each held-out combination (a tiny fine-tuning set)."""
    from expertune.data.captioned import write_dataloader_config
    from expertune.world.dataset import write_world_dataset
    from expertune.world.scene import HELD_OUT, scenes

    images = write_world_dataset(folder / "data", scenes(list(HELD_OUT), 1, seed=0))
    return write_dataloader_config(folder / "dataloader.json", images, folder / "cache", 64)


def _world_task(arm: str, steps: int, folder: Path) -> dict:
    """A study task on the committed world model over `_world_dataloader`, scored on a small evaluation set."""
    from expertune.world import PRETRAINED

    return {"arm": arm, "seed": 0, "steps": steps, "out": str(folder), "base": str(PRETRAINED / "base"),
            "clip": str(PRETRAINED / "clip"), "dataloader": str(_world_dataloader(folder)), "learning_rate": 1e-4,
            "seen": 4, "repeats": 1}


@pytest.mark.integration
def test_a_three_expert_task_trains_one_mixture_job_and_scores_its_chain(tmp_path: Path) -> None:
    result = study.run_task(_world_task("three_experts", 3, tmp_path))
    run = tmp_path / "three_experts" / "seed0" / "mixture"
    assert [(run / f"expert-{k}" / "pipeline" / "expert.json").is_file() for k in range(3)] == [True] * 3
    assert (run / "mixture.json").is_file()
    assert len([k for k in result if k.startswith("eval/loss_")]) == 8 and result["eval/loss"] > 0


@pytest.mark.integration
def test_a_branching_task_trains_its_three_runs_and_scores_the_chain(tmp_path: Path) -> None:
    task = _world_task("branching", 4, tmp_path)
    result = study.run_task(task)
    assert [p.name for p in (tmp_path / "branching" / "seed0").iterdir() if p.is_dir()] != []
    for name in ("shared", "stage1", "stage2"):
        assert (tmp_path / "branching" / "seed0" / name / "pipeline" / "expert.json").is_file()
    losses = [k for k in result if k.startswith("eval/loss_")]
    assert len(losses) == 8 and result["eval/loss"] > 0
    assert 0 <= result["colour/both"] <= 1 and 0 <= result["clip"] <= 100
    # --evaluate_only scores the same trained runs again: the same figures (fixed seeds), no training.
    task = {**task, "evaluate_only": True}
    metrics = (tmp_path / "branching" / "seed0" / "shared" / "metrics.jsonl").read_text()
    again = study.run_task(task)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    assert (tmp_path / "branching" / "seed0" / "shared" / "metrics.jsonl").read_text() == metrics
    with pytest.raises(SystemExit, match="stage1 is not a finished run of 2 steps"):  # S = 5: stage 1 gets 2, not 1
        study.run_task({**task, "steps": 5})


def test_a_variant_arm_trains_as_its_arm_with_its_knobs() -> None:
    assert study.parse_variant("two_huber=two_experts:--loss_type=huber --flip_images") == (
        "two_huber", "two_experts", ["--loss_type=huber", "--flip_images"])
    for bad in ("two_experts=two_experts:--flip_images", "x=nope:--flip_images", "=two_experts:"):
        with pytest.raises(ValueError, match="NAME=ARM:FLAGS"):
            study.parse_variant(bad)
    rows = [{"arm": arm, "seed": 0, "eval/loss": 1.0} for arm in ("two_huber", "one_model")]
    assert list(study.summarise(rows)) == ["one_model", "two_huber"]  # the study's arms first, then the variants

    from expertune.config import load_config

    task = {"dataloader": "d.json", "seed": 3, "learning_rate": 1e-4, "arm": "two_huber", "trains_as": "two_experts",
            "extra_flags": ["--loss_type=huber", "--timestep_bias_strategy=later", "--timestep_bias_multiplier=2"]}
    config, _ = load_config(study.run_flags(task, Path("base"), Path("out"), (350, 999), 10), find_config=False)
    assert (config.train.loss_type, config.band.timestep_bias_strategy, config.band.timestep_range) == (
        "huber", "later", "350,999")
