"""The runs of a workspace as the UI shows them: where they are, their state, bands, checkpoints and summary.

Everything is read from the run folder as training writes it (docs/usage.md, "What a training run writes"):
the lock `.expertune.lock` (`{"pid", "host", "started"}`, held while a job runs), `checkpoints/checkpoint-N`
(complete ones by `train.checkpoint.is_complete`), run.json (written last, when a run finished), mixture.json and
expert.json, metrics.jsonl. A folder that cannot be read is reported as damaged, never raised.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertune.run_folder import LOCK_FILE, lock_holder  # the run folder module owns the lock file
from expertune.train.signals import StopRequests
from expertune.ui.metrics import MetricColumns, MetricsReader

STOP_FILE = StopRequests.STOP_FILE  # the run saves a checkpoint at its next step and stops
UI_DIR = ".expertune-ui"  # the UI's own files in the workspace: job queue, logs, samples
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
RECENT_SECONDS = 300.0  # without a lock file: metrics written this recently mean "running"
_SKIP = {"checkpoints", "validation", "logs", "pipeline", "lora", "exports", "single_file", "hub_upload",
         "cache", "__pycache__", "node_modules", UI_DIR}
_MARKERS = ("metrics.jsonl", "run.json", "checkpoints", LOCK_FILE)


@dataclass
class Band:
    expert: int
    lo: int
    hi: int
    role: str = "trained"  # "trained", or "peer" (the other stage's expert this run validates its chain with)


@dataclass
class RunSummary:
    path: str  # relative to the workspace, "/"-separated
    state: str  # running, finished, failed, interrupted, damaged, empty
    detail: str = ""
    step: int = 0
    total_steps: int | None = None
    eta_seconds: float | None = None
    bands: list[Band] = field(default_factory=list)
    last_eval_loss: float | None = None
    last_clip: float | None = None
    checkpoints: int = 0
    updated: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the object, None), (None, None) when the file is absent, or (None, why) when it is damaged."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"{path.name} is unreadable ({type(error).__name__}): half-written or not expertune's"
    if not isinstance(document, dict):
        return None, f"{path.name} is not a JSON object: not an expertune file"
    return document, None


def find_runs(workspace: Path, max_depth: int = 4) -> list[Path]:
    """Every folder under `workspace` that looks like a run's output_dir (holds metrics.jsonl, run.json,
    checkpoints/ or a lock); the folders a run writes inside itself are not searched."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        names = {entry.name for entry in entries}
        if any(marker in names for marker in _MARKERS):
            found.append(folder)
        if depth >= max_depth:
            return
        for entry in entries:
            if entry.name in _SKIP or entry.name.startswith(".") or re.match(r"^expert-\d+$", entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), depth + 1)
            except OSError:
                continue

    walk(workspace, 0)
    return found


def lock_state(run_dir: Path) -> tuple[str | None, str]:
    """("running", holder) while a live job holds the lock, ("interrupted", why) when its holder is gone,
    (None, "") without a lock file."""
    document, problem = read_json(run_dir / LOCK_FILE)
    if document is None:
        return (None, "") if problem is None else ("running", "a job is starting (lock being written)")
    holder, alive = lock_holder(run_dir)
    if holder is None:
        return "running", "a job is starting (lock being written)"
    return ("running", str(holder)) if alive else ("interrupted", f"its job ({holder}) is gone")


def checkpoint_list(run_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint-N folder by step: its name, step, whether it is complete, and its experts."""
    from expertune.train.checkpoint import is_complete

    root = run_dir / "checkpoints"
    try:
        entries = [(int(m.group(1)), entry) for entry in root.iterdir()
                   if (m := CHECKPOINT_NAME.match(entry.name)) and entry.is_dir()]
    except OSError:
        return []
    listing = []
    for step, entry in sorted(entries):
        experts = sorted(p.name for p in entry.iterdir() if re.match(r"^expert-\d+$", p.name))
        listing.append({"name": entry.name, "step": step, "complete": is_complete(entry),
                        "experts": len(experts) or 1})
    return listing


def _descriptions(run_dir: Path, run_json: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The saved experts' descriptions (expert.json documents), in chain order."""
    mixture, _ = read_json(run_dir / "mixture.json")
    if mixture is not None and isinstance(mixture.get("experts"), list):  # shared fields at its top level
        shared = {k: v for k, v in mixture.items() if k != "experts"}
        return [shared | e for e in mixture["experts"] if isinstance(e, dict)]
    for folder in ("pipeline", "lora"):
        expert, _ = read_json(run_dir / folder / "expert.json")
        if expert is not None:
            return [expert]
    if run_json is not None:
        if isinstance(run_json.get("expert"), dict):
            return [run_json["expert"]]
        if isinstance(run_json.get("experts"), list):
            return [e for e in run_json["experts"] if isinstance(e, dict)]
    return []


def run_config(run_dir: Path, run_json: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's resolved config: run.json's when it finished, else the newest checkpoint's snapshot."""
    if run_json is not None and isinstance(run_json.get("config"), dict):
        return run_json["config"]
    for item in reversed(checkpoint_list(run_dir)):
        state, _ = read_json(run_dir / "checkpoints" / str(item["name"]) / "state.json")
        if state is not None and isinstance(state.get("config"), dict):
            return state["config"]
    return None


def _section(config: dict[str, Any] | None, name: str) -> dict[str, Any]:
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def schedule_of(run_dir: Path, run_json: dict[str, Any] | None,
                config: dict[str, Any] | None) -> dict[str, Any]:
    """The bands (each expert's [lo, hi], chain order; the validation peer's too) and log10 SNR(t) of the run's
    noise schedule, for the schedule chart."""
    from expertune.experts import band_from_settings
    from expertune.mixture import plan_bands
    from expertune.schedule import NoiseSchedule, signal_to_noise_ratio

    descriptions = _descriptions(run_dir, run_json)
    first = descriptions[0] if descriptions else {}
    sched = _section(config, "schedule")
    n = int(first.get("num_train_timesteps", 1000))
    schedule = NoiseSchedule(
        num_train_timesteps=n, beta_start=float(first.get("beta_start", 0.00085)),
        beta_end=float(first.get("beta_end", 0.012)),
        beta_schedule=str(first.get("beta_schedule", "scaled_linear")),
        rescale_betas_zero_snr=bool(first.get("rescale_betas_zero_snr", sched.get("rescale_betas_zero_snr", False))))
    bands: list[Band] = []
    for index, description in enumerate(descriptions):
        lo, hi = description.get("timestep_range", (0, n - 1))
        bands.append(Band(index, int(lo), int(hi)))
    if not bands and config is not None:
        band, mixture = _section(config, "band"), _section(config, "mixture")
        try:
            if mixture.get("mixture_boundaries"):
                planned = plan_bands(str(mixture["mixture_boundaries"]), schedule.alphas_cumprod)
            else:
                planned = [band_from_settings(
                    n, refiner_training=bool(band.get("refiner_training")),
                    refiner_training_strength=float(band.get("refiner_training_strength") or 0.0),
                    refiner_training_invert_schedule=bool(band.get("refiner_training_invert_schedule")),
                    timestep_range=band.get("timestep_range"))]
            bands = [Band(k, b.lo, b.hi) for k, b in enumerate(planned)]
        except (ValueError, TypeError):
            bands = []
    peer = _section(config, "validation").get("validation_peer_expert")
    if isinstance(peer, str) and peer:
        for folder in (Path(peer), Path(peer) / "pipeline", Path(peer) / "lora"):
            expert, _ = read_json(folder / "expert.json")
            if expert is not None and isinstance(expert.get("timestep_range"), list):
                lo, hi = expert["timestep_range"]
                bands.append(Band(len(bands), int(lo), int(hi), "peer"))
                break
    snr = signal_to_noise_ratio(schedule.alphas_cumprod).clamp(min=1e-12).log10().tolist()
    stride = max(1, n // 250)
    curve = [[t, round(snr[t], 4)] for t in range(0, n, stride)] + [[n - 1, round(snr[n - 1], 4)]]
    return {"num_train_timesteps": n, "bands": [asdict(b) for b in bands], "log10_snr": curve,
            "zero_terminal_snr": schedule.rescale_betas_zero_snr}


def last_validation(columns: MetricColumns) -> tuple[float | None, float | None]:
    """The last held-out loss (eval/loss, or eval/mixture_loss) and the last mean CLIP score."""
    loss = clip = None
    for row in columns.validation:
        value = row.get("eval/mixture_loss", row.get("eval/loss"))
        loss = float(value) if value is not None else loss
        score = row.get("clip/mean")
        clip = float(score) if score is not None else clip
    return loss, clip


def summarize(workspace: Path, run_dir: Path, reader: MetricsReader,
              job_states: dict[str, tuple[str, str, int | None]] | None = None) -> RunSummary:
    """The run list's row of `run_dir`. `job_states` maps a run's path to the UI job writing it
    (state, detail, total steps)."""
    relative = run_dir.relative_to(workspace).as_posix() or "."
    summary = RunSummary(relative, "empty")
    try:
        run_json, problem = read_json(run_dir / "run.json")
        if problem is not None:
            summary.state, summary.detail = "damaged", problem
            return summary
        metrics_path = run_dir / "metrics.jsonl"
        columns = reader.read(metrics_path)
        if columns.bad_lines and not columns.training and not columns.validation and run_json is None:
            summary.state = "damaged"
            summary.detail = f"metrics.jsonl holds no expertune rows ({columns.bad_lines} unreadable lines): not a run"
            return summary
        checkpoints = checkpoint_list(run_dir)
        summary.checkpoints = sum(1 for c in checkpoints if c["complete"])
        summary.step = columns.last_step
        summary.last_eval_loss, summary.last_clip = last_validation(columns)
        mtimes = [p.stat().st_mtime for p in (metrics_path, run_dir / "run.json", run_dir / LOCK_FILE) if p.exists()]
        summary.updated = max(mtimes, default=0.0)
        config = run_config(run_dir, run_json)
        total = _section(config, "train").get("max_train_steps")
        summary.total_steps = int(total) if isinstance(total, int) else None
        job = (job_states or {}).get(relative)
        locked, holder = lock_state(run_dir)
        if run_json is not None and locked is None:
            summary.state, summary.detail = "finished", f"{run_json.get('steps', summary.step)} steps"
            steps = run_json.get("steps")
            summary.step = int(steps) if isinstance(steps, int) else summary.step
            summary.total_steps = summary.step
        elif locked is not None:
            summary.state, summary.detail = locked, holder
        elif job is not None:
            summary.state, summary.detail = job[0], job[1]
        elif summary.updated and time.time() - summary.updated < RECENT_SECONDS:
            summary.state, summary.detail = "running", "metrics written in the last minutes (no lock file)"
        elif columns.last_step or checkpoints:
            summary.state, summary.detail = "interrupted", "stopped before its end (no run.json)"
        if job is not None and job[2] is not None and summary.total_steps is None:
            summary.total_steps = job[2]
        if columns.bad_lines:
            summary.detail += f"; {columns.bad_lines} unreadable metrics line(s) skipped"
        if summary.state == "running" and summary.total_steps and columns.recent_seconds:
            per_step = sum(columns.recent_seconds[-50:]) / len(columns.recent_seconds[-50:])
            summary.eta_seconds = max(0, summary.total_steps - summary.step) * per_step
        summary.bands = [Band(**b) for b in schedule_of(run_dir, run_json, config)["bands"]]
    except (OSError, ValueError, TypeError, KeyError) as error:
        summary.state, summary.detail = "damaged", f"cannot be read: {type(error).__name__}: {error}"
    return summary
