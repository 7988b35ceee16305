"""Where data may be written: one function turns an object key or a manifest row into a path under its root.

An `aws` entry's objects are mirrored to `<root>/<key relative to the prefix>`, and a manifest row names a
file relative to its dataset. Both come from data someone else controls, so `contained_path` is the one place
that joins them, and it refuses whatever could leave the root or cannot be a file there: an absolute path
(`data//any/where.png` under the prefix `data/` is `/any/where.png`), empty, `.` and `..` components,
backslashes and NUL characters, and names the file system cannot hold (a component over `MAX_NAME_BYTES`
bytes, a path over `MAX_PATH_BYTES`). A refused name is an `UnsafePath` (a DataError) whose message says why;
callers skip that image and list it, as they do bad images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from expertune.errors import DataError

MAX_NAME_BYTES = 255  # NAME_MAX of ext4, xfs, btrfs, tmpfs
MAX_PATH_BYTES = 4095  # PATH_MAX less its NUL


class UnsafePath(DataError):
    """A key or row that cannot be a file under its root; the image is skipped."""


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def contained_path(root: str | os.PathLike, relative: str) -> Path:
    """`root / relative` for a '/'-separated relative name that stays under `root`; UnsafePath (naming the
    name and why) otherwise. Nothing is touched on disk: a link inside `root` is the caller's own choice."""
    shown = relative if len(relative) <= 120 else relative[:117] + "..."
    if not relative:
        raise UnsafePath(f"name {shown!r} is empty")
    if "\0" in relative or "\\" in relative:
        raise UnsafePath(f"name {shown!r} holds a {'NUL' if chr(0) in relative else 'backslash'} character")
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"name {relative.encode('utf-8', 'backslashreplace').decode()!r} is not UTF-8") from None
    if relative.startswith("/"):
        raise UnsafePath(f"name {shown!r} is an absolute path; it would be written outside {root}")
    parts = relative.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath(f"name {shown!r} has an {'empty' if not part else repr(part)} component; it could "
                             f"leave {root}")
        if len(_encoded(part)) > MAX_NAME_BYTES:
            raise UnsafePath(f"name {shown!r} has a component of {len(_encoded(part))} bytes; the file system "
                             f"holds at most {MAX_NAME_BYTES}")
    path = Path(root, *parts)
    if len(_encoded(os.fspath(path))) > MAX_PATH_BYTES:
        raise UnsafePath(f"name {shown!r} makes a path of over {MAX_PATH_BYTES} bytes under {root}")
    return path


def clashing(names: Iterable[str]) -> set[str]:
    """The names among `names` that are also a folder of another ('a.png' beside 'a.png/b.png'): both cannot be
    files on one disk, so the one that is also a folder is skipped, and its neighbours are kept."""
    names = list(names)
    folders: set[str] = set()
    for name in names:
        parts = name.split("/")
        folders.update("/".join(parts[:end]) for end in range(1, len(parts)))
    return {name for name in names if name in folders}
