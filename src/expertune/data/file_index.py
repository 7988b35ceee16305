"""A persistent index of what was learnt from each input file, so a restart re-reads no image bytes.

An entry is keyed by a `FileStamp`: the file's identity (its absolute path, or `s3://bucket/key` for an
object), its size, and its version (a local file's mtime in nanoseconds, an object's ETag). A stamp
is cheap to get — one `stat`, or the listing a bucket needs anyway — and any edit changes it, so a
changed file misses the index and is read again; an unchanged one is not read at all. Values are
small JSON objects (an image's SHA-256 and size, a caption file's text).

The index is one append-only file beside the caches (`<cache dir>/file_index.jsonl`), a line per entry:
`<format>\t<kind>\t<size>\t<version>\t<identity as a JSON string>\t<value as JSON>` (tab-separated so a
restart splits lines instead of parsing JSON; a value is parsed only when it is looked up).
`flush` appends the new entries in one `O_APPEND` write, so several jobs may share it; a torn or
unknown line is ignored (the file is only a cache: losing an entry costs one re-read, never a wrong
answer, since the stamp must match exactly). When most lines are superseded the file is rewritten
atomically (`compact`).

Whole-folder entries live in a sibling file, `folder_index.jsonl` (`FileIndex.folders`): one line stands for
every image of a folder whose listing is unchanged (its stamp's version digests every name, size and mtime
in it), so a restart that finds every folder unchanged loads that small file and never this one's line per file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from expertune.io_utils import append_bytes, atomic_write_bytes, storage_error

logger = logging.getLogger(__name__)

INDEX_NAME = "file_index.jsonl"
FOLDER_INDEX_NAME = "folder_index.jsonl"  # beside INDEX_NAME: the whole-folder entries (`FileIndex.folders`)
INDEX_VERSION = 1  # bump when a value's meaning changes: older lines are then ignored


class FileStamp(NamedTuple):
    """What identifies one version of a file: identity, size in bytes, and mtime_ns or ETag.

    A named tuple, not a dataclass: a walk makes two for every image, and this is the cheaper one to build."""

    identity: str
    size: int
    version: str


def listing_version(lines: list[str]) -> str:
    """The version of a folder's stamp: a digest of one line per file (its name, size and mtime), in any order."""
    return hashlib.blake2b("\n".join(sorted(lines)).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def local_stamp(path: str | os.PathLike) -> FileStamp:
    """The stamp of a local file (one `stat`); OSError when it cannot be stat'ed."""
    absolute = os.fspath(path)
    if not os.path.isabs(absolute):
        absolute = os.path.abspath(absolute)
    stat = os.stat(absolute)
    return FileStamp(identity=absolute, size=stat.st_size, version=stamp_version(stat))


def stamp_version(stat: os.stat_result) -> str:
    """A local file's version: mtime, inode and ctime (ns). An edit that restores size and mtime still moves the
    ctime (which no one can set back), and a file replaced by another is another inode."""
    return f"{stat.st_mtime_ns}.{stat.st_ino}.{stat.st_ctime_ns}"


class FileIndex:
    """Stamp -> JSON value, loaded once from `path` (None: in memory only), appended to by `flush`.

    `compact_after`: how many lines the file may hold before `flush` rewrites it when over half are superseded."""

    def __init__(self, path: str | os.PathLike | None, *, compact_after: int = 1000) -> None:
        self.path = Path(path) if path is not None else None
        self.compact_after = compact_after
        self._folders: FileIndex | None = None
        # (kind, identity) -> (size, version, value: a dict, or its JSON text until first looked up)
        self._entries: dict[tuple[str, str], tuple[int, str, dict[str, Any] | str]] | None = None
        self._new: list[tuple[str, FileStamp, dict[str, Any]]] = []
        self._lines = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._load())

    @property
    def folders(self) -> FileIndex:
        """The whole-folder entries, kept in `folder_index.jsonl` beside this index and flushed with it.

        Their lines are large (a folder's worth of values each), so few superseded ones are tolerated."""
        if self._folders is None:
            self._folders = FileIndex(self.path.with_name(FOLDER_INDEX_NAME) if self.path is not None else None,
                                      compact_after=16)
        return self._folders

    def _load(self) -> dict[tuple[str, str], tuple[int, str, dict[str, Any] | str]]:
        if self._entries is not None:
            return self._entries
        entries: dict[tuple[str, str], tuple[int, str, dict[str, Any] | str]] = {}
        prefix = f"{INDEX_VERSION}\t"
        if self.path is not None:
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                text = ""
            except OSError as exc:
                logger.warning("file index %s cannot be read (%s); every file is read again", self.path, exc)
                text = ""
            for line in text.splitlines():
                self._lines += 1
                fields = line.split("\t", 5)
                if len(fields) != 6 or not line.startswith(prefix) or not line.endswith("}"):
                    continue  # a torn line (a crash mid-append) or another format
                _, kind, size, version, identity, value = fields
                try:
                    name = identity[1:-1] if "\\" not in identity else json.loads(identity)
                    entries[(kind, name)] = (int(size), version, value)
                except (ValueError, TypeError):
                    continue
        self._entries = entries
        return entries

    def get(self, kind: str, stamp: FileStamp) -> dict[str, Any] | None:
        """The value stored for exactly this stamp (identity, size and version all equal), else None."""
        entries = self._load()
        found = entries.get((kind, stamp.identity))
        if found is not None and found[0] == stamp.size and found[1] == stamp.version:
            value: Any = found[2]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = None
                if not isinstance(value, dict):
                    del entries[(kind, stamp.identity)]
                    self.misses += 1
                    return None
                entries[(kind, stamp.identity)] = (found[0], found[1], value)
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, kind: str, stamp: FileStamp, value: dict[str, Any]) -> None:
        """Remember `value` for `stamp` (replacing an older version of the file); written by `flush`."""
        self._load()[(kind, stamp.identity)] = (stamp.size, stamp.version, dict(value))
        self._new.append((kind, stamp, dict(value)))

    @staticmethod
    def _line(kind: str, identity: str, size: int, version: str, value: dict[str, Any] | str) -> str:
        if any(char in kind + version for char in "\t\n\r"):
            raise ValueError(f"file index kind and version must not hold tabs or newlines: {kind!r}, {version!r}")
        data = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        line = f"{INDEX_VERSION}\t{kind}\t{size}\t{version}\t{json.dumps(identity, ensure_ascii=False)}\t{data}\n"
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8 (a surrogate escape): written JSON-escaped
            plain = json.loads(value) if isinstance(value, str) else value
            line = (f"{INDEX_VERSION}\t{kind}\t{size}\t{version}\t{json.dumps(identity)}\t"
                    f"{json.dumps(plain, separators=(',', ':'))}\n")
        return line

    def flush(self) -> None:
        """Append the entries added since the last flush (one write, and one to the folder entries' file);
        compact when mostly superseded."""
        if self._folders is not None:
            self._folders.flush()
        if self.path is None or not self._new:
            self._new.clear()
            return
        data = "".join(self._line(kind, s.identity, s.size, s.version, v) for kind, s, v in self._new).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_bytes(self.path, data)  # a full disk: StorageError (exit 3); a torn tail line is skipped on load
        except OSError as exc:  # a read-only cache dir: the run goes on, the next one re-reads
            if (full := storage_error(self.path, exc)) is not None:
                raise full from None
            logger.warning("file index %s cannot be written (%s); the next run reads these files again",
                           self.path, exc)
            self._new.clear()
            return
        self._lines += len(self._new)
        self._new.clear()
        if self._lines > self.compact_after and self._lines > 2 * len(self._load()):
            self.compact()

    def compact(self) -> None:
        """Rewrite the file with one line per live entry (atomically; appends racing it may be lost, and
        are then simply re-read by a later run)."""
        if self.path is None:
            return
        entries = self._load()
        data = "".join(self._line(kind, identity, size, version, value)
                       for (kind, identity), (size, version, value) in entries.items()).encode()
        try:
            atomic_write_bytes(self.path, data)
        except OSError as exc:
            logger.warning("file index %s cannot be compacted (%s)", self.path, exc)
            return
        self._lines = len(entries)


class FolderEntries:
    """One kind of whole-folder entry (`FileIndex.folders`), read a folder at a time and written back once.

    `known(listing)`: the remembered {file name: value} of a folder whose listing stamp is unchanged, else {};
    `learn(listing, name, value)` adds a file's value; `remember()` puts every folder that learnt something
    (its known values and the new ones). An entry is stored as {field: {file name: value}}; `index` None keeps
    nothing.
    """

    def __init__(self, index: FileIndex | None, kind: str, field: str) -> None:
        self.index, self.kind, self.field = index, kind, field
        self._known: dict[str, dict[str, Any]] = {}  # folder identity -> its remembered values ({}: none, or changed)
        self._learnt: dict[str, tuple[FileStamp, dict[str, Any]]] = {}  # folder identity -> (listing, new values)

    def known(self, listing: FileStamp) -> dict[str, Any]:
        found = self._known.get(listing.identity)
        if found is None:
            value = self.index.folders.get(self.kind, listing) if self.index is not None else None
            files = value.get(self.field) if value is not None else None
            found = self._known[listing.identity] = files if isinstance(files, dict) else {}
        return found

    def learn(self, listing: FileStamp, name: str, value: Any) -> None:
        self._learnt.setdefault(listing.identity, (listing, {}))[1][name] = value

    def remember(self) -> None:
        if self.index is not None:
            for listing, learnt in self._learnt.values():
                self.index.folders.put(self.kind, listing,
                                       {self.field: {**self._known.get(listing.identity, {}), **learnt}})
        self._learnt.clear()
