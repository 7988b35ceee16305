"""The UI's reading of run folders: states, metrics read incrementally and downsampled, gallery, damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from ui_helpers import write_run

from expertune.train.signals import StopRequests
from expertune.ui.gallery import gallery
from expertune.ui.metrics import MetricsReader, chart_data, downsample
from expertune.ui.runs import LOCK_FILE, find_runs, lock_state, schedule_of, summarize


def test_find_runs_skips_what_a_run_writes_inside_itself(workspace: Path) -> None:
    found = sorted(p.relative_to(workspace).as_posix() for p in find_runs(workspace))
    assert found == ["damaged", "foreign", "stage1", "stage2", "sweep/going"]


def test_states_of_finished_running_interrupted_damaged_and_foreign(workspace: Path) -> None:
    reader = MetricsReader()
    rows = {p.relative_to(workspace).as_posix(): summarize(workspace, p, reader) for p in find_runs(workspace)}
    assert rows["stage1"].state == "finished" and rows["stage1"].step == 6
    assert rows["stage1"].bands[0].lo == 350 and rows["stage1"].bands[0].hi == 999
    assert rows["stage1"].last_eval_loss is not None and rows["stage1"].last_clip == 26.0
    assert rows["sweep/going"].state == "running"  # metrics written just now, no lock: running
    assert rows["damaged"].state == "damaged" and "run.json" in rows["damaged"].detail
    assert rows["foreign"].state == "damaged" and "2 unreadable" in rows["foreign"].detail
    old = workspace / "sweep" / "going" / "metrics.jsonl"
    os.utime(old, (1, 1))
    assert summarize(workspace, old.parent, reader).state == "interrupted"


def _unused_pid() -> int:
    """A PID no process has now (a job that is gone), found without starting one."""
    for pid in range(4_194_000, 1_000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free PID")


def test_lock_of_a_live_job_is_running_and_of_a_dead_one_interrupted(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", 2, finished=False)
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                             "started": "2026-12-03T10:00:00+0000"}))
    assert lock_state(run)[0] == "running"
    (run / LOCK_FILE).write_text(json.dumps({"pid": _unused_pid(), "host": os.uname().nodename, "started": "x"}))
    state, why = lock_state(run)
    assert state == "interrupted" and "gone" in why
    summary = summarize(tmp_path, run, MetricsReader())
    assert summary.state == "interrupted"


def test_eta_of_a_running_run_from_its_step_times(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", 4, finished=False)
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "x"}))
    summary = summarize(tmp_path, run, MetricsReader(), {"r": ("running", "UI job", 100)})
    assert summary.total_steps == 100 and summary.eta_seconds == 96 * 0.25


def test_metrics_are_read_incrementally_and_a_torn_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 2}\n{"step": 2, "lo', encoding="utf-8")
    reader = MetricsReader()
    assert reader.read(path).last_step == 1
    with open(path, "a", encoding="utf-8") as stream:
        stream.write('ss": 0.5, "lr": 0.1, "grad_norm": 1}\n{"step": 2, "kind": "validation", "eval/loss": NaN}\n')
    columns = reader.read(path)
    assert columns.last_step == 2 and columns.training[0]["loss"] == [1.0, 0.5] and columns.bad_lines == 0
    assert len(columns.validation) == 1
    path.write_text('{"step": 1, "loss": 3.0}\n', encoding="utf-8")  # a resume rewrote it shorter
    assert reader.read(path).training[0]["loss"] == [3.0]


def test_downsample_keeps_bucket_mean_min_max_and_the_last_step() -> None:
    steps = [float(s) for s in range(1, 100_001)]
    values = [float(s % 10) for s in range(1, 100_001)]
    out = downsample(steps, values, 500)
    assert len(out["step"]) == 500 and out["step"][-1] == 100_000
    assert out["min"][0] == 0 and out["max"][0] == 9 and abs(out["mean"][0] - 4.5) < 1e-9  # type: ignore[operator]
    assert downsample([1.0, 2.0], [float("nan"), 1.0], 1)["mean"] == [1.0]


def test_chart_data_groups_a_mixture_by_expert(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "expert": s % 2, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0}) + "\n"
                            for s in range(1, 11)), encoding="utf-8")
    data = chart_data(MetricsReader().read(path), 3)
    assert sorted(data["training"]) == ["0", "1"]  # type: ignore[arg-type]
    assert len(data["training"]["0"]["loss"]["step"]) == 3  # type: ignore[index]


def test_gallery_is_a_prompt_by_step_grid_with_clip_scores(workspace: Path) -> None:
    run = workspace / "stage1"
    grid = gallery(run, workspace, MetricsReader().read(run / "metrics.jsonl"))
    assert grid["steps"] == [0, 2, 4, 6]
    group = grid["groups"][0]  # type: ignore[index]
    assert group["name"] == "expert 0" and [r["image"] for r in group["rows"]] == ["text_to_image_p0", "text_to_image_p1"]
    assert group["rows"][0]["cells"]["6"] == "stage1/validation/step_000006/text_to_image_p0.png"
    assert grid["clip"]["6"]["text_to_image_prompt"] == 26.0  # type: ignore[index]


def test_schedule_has_the_bands_and_a_peer_and_falling_snr(workspace: Path, tmp_path: Path) -> None:
    run = workspace / "stage2"
    document = json.loads((run / "run.json").read_text())
    (workspace / "stage1" / "pipeline").mkdir()
    (workspace / "stage1" / "pipeline" / "expert.json").write_text(json.dumps(document["expert"] | {"timestep_range": [350, 999]}))
    config = document["config"] | {"validation": {"validation_peer_expert": str(workspace / "stage1")}}
    schedule = schedule_of(run, document, config)
    assert [(b["lo"], b["hi"], b["role"]) for b in schedule["bands"]] == [(0, 349, "trained"), (350, 999, "peer")]
    snr = [v for _, v in schedule["log10_snr"]]
    assert snr[0] > snr[len(snr) // 2] > snr[-2]
    # a run still going has no run.json: its bands come from the band settings of its config
    settings = {"band": {"refiner_training": True, "refiner_training_strength": 0.35,
                         "refiner_training_invert_schedule": False, "timestep_range": None}}
    bands = schedule_of(tmp_path, None, settings)["bands"]
    assert [(b["lo"], b["hi"]) for b in bands] == [(0, 349)]  # type: ignore[index]


def test_stop_file_is_a_stop_request_and_is_removed_after(tmp_path: Path) -> None:
    with StopRequests(tmp_path) as stop:
        assert not stop.requested
        (tmp_path / StopRequests.STOP_FILE).write_text("x")
        assert stop.requested and stop.received is not None
    assert not (tmp_path / StopRequests.STOP_FILE).exists()


def test_a_mixture_run_has_every_band_an_expert_gallery_each_and_the_chain(tmp_path: Path) -> None:
    run = tmp_path / "mix"
    experts = [{"path": f"expert-{k}/pipeline", "timestep_range": band} for k, band in
               enumerate([[700, 999], [350, 699], [0, 349]])]
    run.mkdir()
    (run / "mixture.json").write_text(json.dumps({"format_version": 1, "experts": experts, "num_train_timesteps": 1000,
                                                  "rescale_betas_zero_snr": True}))
    rows = [{"step": s, "expert": s % 3, "loss": 0.1, "lr": 1e-4, "grad_norm": 1.0} for s in range(1, 7)]
    rows += [{"step": 6, "kind": "validation", "expert": k, "eval/loss_0_174": 0.2} for k in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for k in range(3):
        folder = run / "validation" / "step_000006" / f"expert_{k}"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / f"text_to_image_p{k}.png")
    Image.new("RGB", (8, 8)).save(run / "validation" / "step_000006" / "expert_0" / "chain_p.png")
    schedule = schedule_of(run, None, None)
    assert [(b["lo"], b["hi"]) for b in schedule["bands"]] == [(700, 999), (350, 699), (0, 349)]
    assert schedule["zero_terminal_snr"] is True  # from mixture.json's shared fields
    columns = MetricsReader().read(run / "metrics.jsonl")
    assert sorted(columns.training) == [0, 1, 2]
    names = [g["name"] for g in gallery(run, tmp_path, columns)["groups"]]  # type: ignore[index]
    assert names == ["expert 0", "expert 1", "expert 2", "chain"]
