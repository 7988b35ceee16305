"""The UI's job queue: training runs, exports and samples as child processes of expertune's own verbs.

The queue lives in `WORKSPACE/.expertune-ui/jobs.json` (rewritten atomically), each job's log beside it, so a UI
started again finds its jobs, queued or running. Jobs run in lanes, one job at a time in each: `device`
(training runs and samples: they use the accelerator) and `files` (exports). A job is `jobrun`'s process in a session of its own: closing the UI
never stops it, and its exit code lands in a file the UI reads when it comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from expertune.errors import ConfigError
from expertune.io_utils import atomic_write_json
from expertune.run_folder import process_alive
from expertune.ui.runs import UI_DIR

VERBS = ("train", "generate", "export")  # the only verbs a UI job runs (expertune/jobrun.py checks them too)

# Training and sampling use the device, one job at a time; exports (reading and converting files) run beside them.
LANES = {"train": "device", "generate": "device", "export": "files"}
LOG_CHUNK = 65536


@dataclass
class Job:
    id: str
    verb: str
    args: list[str]
    title: str
    run: str | None = None  # the run folder it writes or reads, relative to the workspace
    total_steps: int | None = None
    output: str | None = None  # a sample's image, relative to the workspace
    state: str = "queued"  # queued, running, finished, stopped (SIGINT/SIGTERM: 130/143), failed, cancelled
    pid: int | None = None
    rc: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None

    @property
    def lane(self) -> str:
        return LANES[self.verb]


class JobQueue:
    """Start with `start()`; `submit` adds a job; a thread starts the next job of a lane when the lane is free."""

    def __init__(self, workspace: Path, python: str = sys.executable, poll_seconds: float = 0.3) -> None:
        self.workspace = workspace
        self.folder = workspace / UI_DIR / "jobs"
        self.file = workspace / UI_DIR / "jobs.json"
        self.python = python
        self.poll_seconds = poll_seconds
        self.jobs: list[Job] = self._load()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_lock: IO[str] | None = None

    def _load(self) -> list[Job]:
        try:
            document = json.loads(self.file.read_text(encoding="utf-8"))
            return [Job(**item) for item in document.get("jobs", [])]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, AttributeError):
            broken = self.file.with_name(f"jobs.unreadable-{int(time.time())}.json")
            os.replace(self.file, broken)  # keep it for the user; start an empty queue
            return []

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, {"format_version": 1, "jobs": [asdict(job) for job in self.jobs]})

    def log_path(self, job: Job) -> Path:
        return self.folder / f"{job.id}.log"

    def _result_path(self, job: Job) -> Path:
        return self.folder / f"{job.id}.result.json"

    def start(self) -> None:
        """Take the workspace's queue (one UI per workspace starts jobs) and start following it."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder.parent / "queue.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"ui: another expertune ui ({holder}) serves {self.workspace}; use that one, or stop "
                              "it first (two would start the same queued jobs)") from None
        handle.truncate(0)
        handle.write(f"PID {os.getpid()}\n")
        handle.flush()
        self._queue_lock = handle
        with self._lock:
            self._tick()
        self._thread = threading.Thread(target=self._loop, name="expertune-ui-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching (the jobs themselves keep running)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._queue_lock is not None:
            self._queue_lock.close()  # releases the flock
            self._queue_lock = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            with self._lock:
                self._tick()

    def submit(self, job: Job) -> Job:
        if job.verb not in VERBS:
            raise ValueError(f"not a verb a UI job runs: {job.verb}")
        with self._lock:
            job.id = f"{int(time.time() * 1000):x}-{len(self.jobs)}"
            self.jobs.append(job)
            self._save()
            self._tick()
        return job

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is dropped; a running one gets SIGTERM (a training run saves a checkpoint and stops)."""
        with self._lock:
            job = self.find(job_id)
            if job is None:
                return None
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif job.state == "running" and job.pid is not None:
                try:
                    os.kill(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self._save()
            return job

    def find(self, job_id: str) -> Job | None:
        return next((job for job in self.jobs if job.id == job_id), None)

    def snapshot(self) -> list[Job]:
        with self._lock:
            return list(self.jobs)

    def _tick(self) -> None:
        changed = False
        for job in self.jobs:
            if job.state == "running":
                changed |= self._check(job)
        for lane in set(LANES.values()):
            if any(job.state == "running" and job.lane == lane for job in self.jobs):
                continue
            waiting = next((job for job in self.jobs if job.state == "queued" and job.lane == lane), None)
            if waiting is not None:
                self._launch(waiting)
                changed = True
        if changed:
            self._save()

    def _check(self, job: Job) -> bool:
        """Whether `job` ended (its result file, or its process gone without one: killed)."""
        child = self._children.get(job.id)
        if child is not None:
            child.poll()  # reap it
        result = self._result_path(job)
        if result.exists():
            try:
                job.rc = int(json.loads(result.read_text(encoding="utf-8"))["rc"])
            except (OSError, ValueError, KeyError, TypeError):
                return False  # being written: next tick
        elif job.pid is not None and process_alive(job.pid) and (child is None or child.returncode is None):
            return False
        elif child is not None and child.returncode is not None:
            job.rc = child.returncode
        job.state = "finished" if job.rc == 0 else "stopped" if job.rc in (130, 143) else "failed"
        job.ended = time.time()
        self._children.pop(job.id, None)
        return True

    def _launch(self, job: Job) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [self.python, "-m", "expertune.jobrun", str(self._result_path(job)), job.verb, *job.args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "1"}
        with open(self.log_path(job), "ab") as log:
            log.write(f"$ expertune {job.verb} {' '.join(job.args)}\n".encode("utf-8"))
            log.flush()
            try:
                child = subprocess.Popen(argv, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=environment, start_new_session=True)
            except OSError as error:
                log.write(f"could not start: {error}\n".encode("utf-8"))
                job.state, job.rc, job.ended = "failed", 127, time.time()
                return
        self._children[job.id] = child
        job.state, job.pid, job.started = "running", child.pid, time.time()

    def read_log(self, job: Job, offset: int) -> tuple[str, int]:
        """Up to LOG_CHUNK bytes of the job's log from `offset` (progress bars' carriage returns as new lines)."""
        try:
            with open(self.log_path(job), "rb") as stream:
                stream.seek(max(0, offset))
                data = stream.read(LOG_CHUNK)
        except OSError:
            return "", offset
        return data.decode("utf-8", errors="replace").replace("\r", "\n"), offset + len(data)

    def tail(self, job: Job, lines: int = 12) -> list[str]:
        try:
            with open(self.log_path(job), "rb") as stream:
                stream.seek(max(0, self.log_path(job).stat().st_size - 8192))
                text = stream.read().decode("utf-8", errors="replace").replace("\r", "\n")
        except OSError:
            return []
        return [line for line in text.split("\n") if line.strip()][-lines:]
