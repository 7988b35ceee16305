"""Fixtures of the training tests: a real, size-limited file system for full-disk tests."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount(folder: Path, size_kib: int, remount: bool = False) -> str | None:
    """Mount (or resize) a tmpfs of `size_kib` KiB at `folder`; the reason it failed, else None."""
    options = f"size={size_kib}k" + (",remount" if remount else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


@pytest.fixture
def resizable_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`resizable_disk(kib)` (the training tests resize it as they go; tests/conftest.py's `small_disk` is a fixed 2 MiB one): a freshly mounted tmpfs of that size (a real file system that fills up and answers
    ENOSPC); calling it again on the same mount resizes it (`mount -o remount`). Unmounted afterwards. Skipped,
    with the reason, only where mounting is impossible (not root, no mount command, a container without it)."""
    folder = tmp_path / f"small-disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mounted = False

    def make(size_kib: int) -> Path:
        nonlocal mounted
        problem = _mount(folder, size_kib, remount=mounted)
        if problem is not None:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({problem}): full-disk behaviour needs a real small "
                        "file system")
        mounted = True
        return folder

    yield make
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)
