"""Crash-safe file writes: write under a temporary name in the same directory, then rename.

Every file written here honours the process umask (mode `0o666 & ~umask`, as `open` would give), so a cache
shared by a team's users stays readable to all of them. A full disk (ENOSPC, or a quota: EDQUOT) is a
`StorageError` (exit 3) naming the file and what to free, with no partial file left behind (`storage_error`
makes the same error from a write elsewhere, safetensors' own error included).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator

from expertune.errors import StorageError

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (from /proc on Linux, a few microseconds; elsewhere by setting and restoring it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from `open` under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~current_umask()


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full: an OSError, or safetensors' own error."""
    if isinstance(error, OSError):
        return error.errno in _FULL
    text = str(error)
    return type(error).__name__ == "SafetensorError" and (
        "No space left" in text or "os error 28" in text or "os error 122" in text or "Disk quota" in text)


def storage_error(path: str | os.PathLike, error: BaseException) -> StorageError | None:
    """The StorageError (exit 3) for a full disk while writing `path`, naming it and what to free; None for any
    other error (re-raise that one)."""
    if not is_disk_full(error):
        return None
    folder = Path(path).parent
    try:
        usage = shutil.disk_usage(folder)
        left = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        left = "free space unknown"
    return StorageError(f"{path}: the disk is full ({left} on the file system holding {folder}); nothing partial "
                        "was left. Free space there (old checkpoints, caches of other models, or move the "
                        "cache/output dir elsewhere) and run again.")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary stream whose bytes replace `path` in one rename when the block ends (fsynced first); on any
    error the temporary file is removed and `path` is left as it was. A full disk raises `storage_error`."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise storage_error(target, exc) or exc
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), file_mode())  # mkstemp makes 0600
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        full = storage_error(target, exc)
        if full is not None:
            raise full from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a torn one."""
    with atomic_writer(path) as stream:
        stream.write(data)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def append_bytes(path: str | os.PathLike, data: bytes, *, sole_writer: bool = False) -> None:
    """Append `data` to `path` in one `O_APPEND` write (created with `file_mode`). A full disk raises
    `storage_error`; with `sole_writer` (no other process appends to it: metrics.jsonl) the file is first cut back
    to its length before the write, so no torn line is left. Shared files (indexes, journals) keep a torn tail,
    which their readers skip."""
    target = os.fspath(path)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, file_mode())
    try:
        before = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write: the rest, which raises ENOSPC when the disk is full
                written += os.write(fd, data[written:])
        except OSError as exc:
            full = storage_error(target, exc)
            if full is None:
                raise
            if sole_writer:
                os.ftruncate(fd, before)
            raise full from None
    finally:
        os.close(fd)


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a fully written directory into place; an older `target` is removed only afterwards."""
    staged, target = Path(staged), Path(target)
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, target)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside `target` to fill; on success it replaces `target` in one rename.

    On any error the staged files are removed and `target` is left as it was.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        staged = scratch / final.name
        staged.mkdir()
        yield staged
        replace_dir(staged, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to the disk (a directory: so a rename into it survives a power
    loss). File systems that cannot fsync a directory are passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def default_cache_dir() -> Path:
    """Per-user cache root (the cache_dir option's default; here so models/ need not import config/): ``$XDG_CACHE_HOME/expertune``, or ``~/.cache/expertune``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "expertune"
