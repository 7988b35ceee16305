"""The run folder (`output_dir`): its paths, the lock that keeps one job per folder, the checkpoint list and its
lineage, digest manifests, and the leftovers a killed job leaves. Training writes through this module; the verbs
that read a run (export, report, ui) read through it.

    output_dir/
      .expertune.lock           held (fcntl.flock) by the job running in the folder: {"pid", "host", "started"}
      checkpoints/
        checkpoint-<step>/      one complete checkpoint (train.checkpoint), with manifest.json (a digest per file)
        lineage.json            {"abandoned": [names]}: checkpoints a resume from an older one left behind
      run.json, metrics.jsonl, mixture.json, pipeline/ | expert-<k>/pipeline/, validation/, logs/

What is guaranteed on a local file system (ext4, xfs, btrfs, tmpfs): one job per folder (a second is refused
naming the holder), every checkpoint file fsynced before its directory is renamed into place and before an older
checkpoint is deleted, and `latest` naming the most recently written checkpoint of the run's lineage whose digests
verify. Not guaranteed: locking on a network file system (NFS, SMB, FUSE mounts may not honour flock between
machines), nor durability on a disk that lies about its flushes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from expertune.errors import ConfigError, StorageError
from expertune.io_utils import atomic_write_json, fsync_path, is_disk_full

log = logging.getLogger(__name__)

LOCK_FILE = ".expertune.lock"
CHECKPOINTS = "checkpoints"
LINEAGE_FILE = "lineage.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
DIGEST = "sha256"  # hardware-accelerated on current x86 and ARM CPUs: faster than blake2b there


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


# ---- one job per folder -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host}, started {self.started}"


def lock_holder(output_dir: Path) -> tuple[LockHolder | None, bool]:
    """Who holds (or last held) the run's lock, and whether that process may still be running: a holder on this
    host whose PID is gone is not; one on another host is assumed alive (its PID cannot be checked from here).
    (None, False) without a readable lock file. For readers (ui, report); jobs use RunLock."""
    holder = _read_holder(Path(output_dir) / LOCK_FILE)
    if holder is None:
        return None, False
    return holder, holder.host != socket.gethostname() or process_alive(holder.pid)


def _read_holder(path: Path) -> LockHolder | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(document["pid"]), str(document["host"]), str(document["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process of that PID exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on `output_dir/.expertune.lock` for as long as a job runs in the folder.

    The kernel drops a flock when its holder dies (even by SIGKILL), so a lock left by a dead job is taken over
    (with a warning naming it); a live holder makes `acquire` raise ConfigError naming its PID, host and start.
    The file is removed on release, so a folder a job finished cleanly holds no lock file."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise StorageError(f"cannot lock {self.path}: {error.strerror or error}") from None
                holder = _read_holder(self.path)
                raise ConfigError(
                    f"output_dir {self.path.parent} is in use by another expertune job "
                    f"({holder or 'holder unknown'}; lock file {self.path}): wait for it to finish, stop it, or "
                    "choose another --output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder unlinked while we waited for it
                break
            os.close(fd)
        self._fd = fd
        stale = _read_holder(self.path)
        if stale is not None and stale.pid != os.getpid():
            dead = stale.host == socket.gethostname() and not process_alive(stale.pid)
            log.warning("taking over the lock of %s: %s (%s)", self.path.parent, stale,
                        "that process is gone" if dead else "its lock was released")
        document = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(document) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still held: a waiter then finds the file gone and retries
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- digests ------------------------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, DIGEST).hexdigest()


def seal(directory: Path) -> None:
    """fsync every file under `directory` and write `manifest.json`: each file's size and digest, read back from
    the disk (so it describes what was written, not what was meant to be)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST_FILE:
            continue
        with open(path, "rb") as stream:
            digest = hashlib.file_digest(stream, DIGEST).hexdigest()
            os.fsync(stream.fileno())
        files[relative] = {"size": path.stat().st_size, DIGEST: digest}
    atomic_write_json(directory / MANIFEST_FILE, {"format_version": 1, "files": files})
    for folder in sorted({p.parent for p in directory.rglob("*")} | {directory}, key=lambda p: -len(p.parts)):
        fsync_path(folder)


def manifest_problem(directory: Path, *, digests: bool = True) -> str | None:
    """Why `directory` does not match its manifest (naming the file), or None when every file does. Without
    `digests` only the presence and sizes are checked (cheap: for listings)."""
    manifest = directory / MANIFEST_FILE
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        files = document["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return f"{manifest} is missing"
    except (OSError, ValueError, KeyError, AssertionError):
        return f"{manifest} is unreadable"
    for relative, expected in files.items():
        path = directory / relative
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != expected.get("size"):
            return f"{path} has {size} bytes, its manifest says {expected.get('size')} (truncated or replaced)"
        if digests and file_digest(path) != expected.get(DIGEST):
            return f"{path} does not match its {DIGEST} digest (damaged on disk)"
    return None


# ---- checkpoints and their lineage -----------------------------------------------------------------------------

def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory, complete or not, by step."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def abandoned(output_dir: Path) -> set[str]:
    """Checkpoint names a resume from an older checkpoint left behind (never `latest`, pruned first)."""
    try:
        document = json.loads((checkpoints_dir(output_dir) / LINEAGE_FILE).read_text(encoding="utf-8"))
        return {str(name) for name in document.get("abandoned", [])}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, AttributeError):
        log.warning("ignoring unreadable %s", checkpoints_dir(output_dir) / LINEAGE_FILE)
        return set()


def set_abandoned(output_dir: Path, names: set[str]) -> None:
    path = checkpoints_dir(output_dir) / LINEAGE_FILE
    if not names and not path.exists():
        return
    atomic_write_json(path, {"format_version": 1, "abandoned": sorted(names)})
    fsync_path(path.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves it looking like a complete one: it is renamed to a
    hidden name first (removed at the next start if the crash comes before the end)."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


# ---- leftovers of killed jobs -----------------------------------------------------------------------------------

# io_utils.replace_dir's and remove_dir's retired copies:
_OLD = re.compile(r"^\.(?P<name>pipeline|lora|checkpoint-\d+)\.old-\d+$")
_STAGED = re.compile(r"^\.(?P<name>pipeline|lora)\.[A-Za-z0-9_]+$")  # io_utils.staged_directory's scratch
# io_utils.atomic_write_bytes's temporary files of what a run writes, and outputs.check_output_dir's probe:
_TEMPORARY = re.compile(r"^\.(run\.json|metrics\.jsonl|mixture\.json|lineage\.json|expert\.json|[^/]+\.png)"
                        r"\.[a-z0-9_]+\.tmp$|^\.write-test-\d+$")
_PARTIAL = re.compile(r"^\.checkpoint-\d+\..+\.partial$")


def remove_leftovers(output_dir: Path, expert_folders: int = 64) -> list[Path]:
    """Remove what a killed job of this folder left half-done (call it holding the lock): retired copies of
    exports (`.pipeline.old-<pid>`, restored when the export they were replaced by never landed), staged export
    scratch, atomic-write temporary files and partial checkpoints. Only names the run itself writes are touched."""
    output_dir = Path(output_dir)
    places = [output_dir, checkpoints_dir(output_dir)]
    places += [output_dir / f"expert-{k}" for k in range(expert_folders) if (output_dir / f"expert-{k}").is_dir()]
    validation = output_dir / "validation"
    if validation.is_dir():
        places += [p for p in validation.rglob("*") if p.is_dir()] + [validation]
    removed = []
    for place in places:
        if not place.is_dir():
            continue
        for entry in sorted(place.iterdir()):
            old = _OLD.match(entry.name)
            if old and not (place / old.group("name")).exists() and place != checkpoints_dir(output_dir):
                log.warning("restoring %s from %s (an export was killed while replacing it)",
                            place / old.group("name"), entry)
                os.replace(entry, place / old.group("name"))
                continue
            if not (old or _STAGED.match(entry.name) or _TEMPORARY.match(entry.name) or _PARTIAL.match(entry.name)):
                continue
            log.warning("removing %s (left by a job that was killed)", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ---- full disks -------------------------------------------------------------------------------------------------

def disk_full_error(what: str, path: Path, needed: int | None = None) -> StorageError:
    """The one line a full disk ends a run with: what could not be written where, and what to free."""
    free = "unknown"
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with contextlib.suppress(OSError):
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB"
    wanted = f"about {needed / 2**20:.1f} MiB more, " if needed else ""
    return StorageError(
        f"could not write {what} {path}: the disk is full ({free} free there); nothing partial was left. Free "
        f"{wanted}e.g. old checkpoints or caches on that file system (or point --output_dir elsewhere), then "
        "continue with --resume_from_checkpoint latest")


@contextlib.contextmanager
def disk_full_is_a_stop(what: str, path: Path) -> Iterator[None]:
    """Turn a full disk while writing `what` (at `path`) into a StorageError (exit 3) with the one line above."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(what, path) from None
        raise
