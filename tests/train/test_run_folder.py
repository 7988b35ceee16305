"""The run folder: one job per output directory, leftovers of killed jobs, what --overwrite_output_dir clears."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertune.errors import ConfigError
from expertune.run_folder import LOCK_FILE, RunLock, remove_leftovers
from expertune.train.outputs import check_output_dir

HOLD = """
import sys, time
from pathlib import Path
from expertune.run_folder import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.integration  # starts a process (the conftest rule)
def test_a_second_job_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another expertune job \(PID {holder.pid} on "
                                              rf"{socket.gethostname()}, started 20") as info:
            RunLock(tmp_path).acquire()
        assert info.value.exit_code == 2
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration  # starts a process (the conftest rule)
def test_the_lock_of_a_killed_job_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "started": "2026-12-03T10:00:00+0000"}))
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path).acquire()
    assert f"PID {dead.pid}" in caplog.text and "that process is gone" in caplog.text
    written = json.loads((tmp_path / LOCK_FILE).read_text())
    assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):  # held: even this process cannot take it twice
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()  # a job that ends cleanly leaves no lock file
    with RunLock(tmp_path) as again:
        assert again.held


@pytest.mark.integration  # starts a process (the conftest rule)
def test_the_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    deadline = time.monotonic() + 5
    lock = RunLock(tmp_path)
    while not lock.held:
        try:
            lock.acquire()
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lock.release()


def test_leftovers_of_killed_exports_and_writes_are_removed_and_user_files_kept(tmp_path: Path) -> None:
    out = tmp_path
    for folder in ("pipeline", ".pipeline.old-4242", ".pipeline.k2j3h4_x", "expert-1/.lora.old-17",
                   "checkpoints/.checkpoint-4.abc.partial", "checkpoints/.checkpoint-2.old-99", "my-notes.d"):
        (out / folder).mkdir(parents=True)
        (out / folder / "weights.bin").write_bytes(b"x")
    (out / ".run.json.a1b2c3.tmp").write_text("{")
    (out / "validation" / "step_000002").mkdir(parents=True)
    (out / "validation" / "step_000002" / ".grid.png.zz9_q.tmp").write_bytes(b"png")
    (out / ".my-own-hidden-file").write_text("mine")
    (out / ".notes.a1b2c3.tmp").write_text("mine: a name the run never writes")
    (out / ".write-test-77").write_text("")
    (out / ".backup.old-1").write_text("mine")
    (out / "notes.tmp").write_text("mine too")
    # a kill between retiring expert-0's pipeline and moving the new one in: the old one comes back
    (out / "expert-0" / ".pipeline.old-31").mkdir(parents=True)
    (out / "expert-0" / ".pipeline.old-31" / "expert.json").write_text("{}")
    remove_leftovers(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != "weights.bin") == [
        ".backup.old-1", ".my-own-hidden-file", ".notes.a1b2c3.tmp", "checkpoints", "expert-0", "expert-0/pipeline",
        "expert-0/pipeline/expert.json", "expert-1", "expert-1/lora", "my-notes.d", "notes.tmp", "pipeline", "validation", "validation/step_000002"]


def test_overwrite_clears_the_old_mixture_but_not_the_users_files(tmp_path: Path) -> None:
    for name in ("mixture.json", "run.json", "metrics.jsonl", "README.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        check_output_dir(tmp_path, overwrite=False, resuming=False)
    check_output_dir(tmp_path, overwrite=True, resuming=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    (tmp_path / "mixture.json").write_text("{}")  # a mixture alone is an earlier run too
    with pytest.raises(ConfigError, match=r"already holds a run \(mixture\.json\)"):
        check_output_dir(tmp_path, overwrite=False, resuming=False)
