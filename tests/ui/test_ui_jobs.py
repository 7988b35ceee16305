"""The UI's job queue with real child processes of expertune's verbs: one at a time per lane, a queue that
survives a restart of the UI, and a failed job that shows its exit code and last log lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from expertune.ui.jobs import Job, JobQueue

pytestmark = pytest.mark.integration  # launches processes


def _wait(condition, seconds: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_jobs_run_one_at_a_time_and_survive_a_restart_of_the_ui(workspace: Path) -> None:
    broken = workspace / "stage1" / "checkpoints" / "checkpoint-1"
    broken.mkdir(parents=True)  # no files: export refuses it (exit 2)
    first = JobQueue(workspace)
    first.start()
    a = first.submit(Job("", "export", [str(broken)], "export a", run="stage1"))
    b = first.submit(Job("", "export", [str(broken)], "export b", run="stage1"))
    assert a.state == "running" and b.state == "queued"  # the files lane runs one job at a time
    first.close()  # the UI goes away while `a` runs; `a` does not
    second = JobQueue(workspace)
    assert [job.state for job in second.jobs] == ["running", "queued"]
    second.start()
    try:
        assert second.cancel(b.id) is not None and second.find(b.id).state == "cancelled"  # type: ignore[union-attr]
        _wait(lambda: second.find(a.id).state == "failed")  # type: ignore[union-attr]
        ended = second.find(a.id)
        assert ended is not None and ended.rc == 2  # read from its result file, not from a child of this queue
        assert any("expertune: error" in line for line in second.tail(ended))
        assert second.find(b.id).state == "cancelled" and not second.log_path(b).exists()  # type: ignore[union-attr]
    finally:
        second.close()
