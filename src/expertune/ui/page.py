"""The run page's data in one place: what `GET /api/run` answers and what `expertune report` inlines."""

from __future__ import annotations

from pathlib import Path

from expertune.ui.gallery import gallery
from expertune.ui.metrics import MetricsReader
from expertune.ui.runs import STOP_FILE, checkpoint_list, read_json, run_config, schedule_of, summarize


def run_page(workspace: Path, run_dir: Path, reader: MetricsReader,
             job_states: dict[str, tuple[str, str, int | None]] | None = None) -> dict[str, object]:
    """Summary, schedule and bands, checkpoints, gallery, resolved config and run.json (without its config) of
    `run_dir`; a damaged run gives its summary and the problem only."""
    summary = summarize(workspace, run_dir, reader, job_states)
    run_json, problem = read_json(run_dir / "run.json")
    document: dict[str, object] = {"summary": summary.to_json(), "problem": problem}
    if summary.state == "damaged":
        return document
    config = run_config(run_dir, run_json)
    columns = reader.read(run_dir / "metrics.jsonl")
    document.update(schedule=schedule_of(run_dir, run_json, config), checkpoints=checkpoint_list(run_dir),
                    gallery=gallery(run_dir, workspace, columns), config=config,
                    run_json={k: v for k, v in (run_json or {}).items() if k != "config"} or None,
                    stop_requested=(run_dir / STOP_FILE).exists())
    return document
