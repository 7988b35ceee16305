"""A content-addressed store of tensors: one safetensors file per key, written atomically, shared safely.

A key is the SHA-256 of everything that determines the entry's content (`cache_key`), so two jobs
that would compute the same tensors — stage 1 and stage 2 on one dataset — find the same file, and
anything that changes the content (image bytes, crop, model weights, dtype) gives a new key instead
of a stale hit. Files hold no pickle: tensors and a str->str metadata header only.

Several processes may fill one store at once (stage 2 started while stage 1 is still caching,
`expertune cache` beside a training job, the ranks of one job). Three rules make that safe:

- *atomic entries*: an entry is written under a temporary name and renamed into place, so a reader
  sees a whole entry or none, and a crash leaves no half entry behind;
- *one writer per entry*: before encoding a missing entry a process takes an exclusive `flock` on
  `<key>.lock` beside it and checks again; a process that cannot take the lock at once leaves that
  entry for later and goes on with others, then waits for it — holding no other lock while it waits,
  so two jobs never deadlock — and finds it written (or, if its writer died, writes it itself). The
  kernel drops a dead process's locks, so a crash never leaves a stale lock. The lock file is
  removed once the entry exists; anyone who locked the removed file re-checks and sees the entry;
- *a journal*: every write appends one line `<key> <pid> <host> <unix time>` to `<root>/writes.log`
  (one `O_APPEND` write), so "who encoded what, and how often" is on disk for people and tests.

Entries prove their bytes: each carries in its metadata an XXH3-128 digest (`DIGEST_FIELD`) of its header
(dtypes, shapes, offsets, the other metadata) and its tensor bytes, and holds only finite values (`put` refuses
NaN and infinity: `NonFiniteEntry`). The first read of an entry in a process (`get`, `contains`, `missing`)
checks both; later reads of the same file (inode, size, mtime, ctime unchanged) do not. A damaged entry — a
flipped bit, a torn or rewritten header, non-finite values — is removed with one warning naming it, so the
next `ensure` rebuilds it; an entry of an older expertune, without a digest, is removed and rebuilt too (one
info line each). `verified.jsonl` remembers shard folders whose every entry passed these checks, keyed by a
listing of inode, size, mtime and ctime, so it vouches only for bytes it checked itself.

`flock` needs a local file system or NFS with working locks (Linux: NFSv4 or lockd).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, overload

import torch
from safetensors import SafetensorError, safe_open

from expertune.cache.entry import (  # noqa: F401  (DIGEST_FIELD, entry_digest: re-exported for callers)
    DIGEST_FIELD,
    NO_DIGEST,
    DamagedEntry,
    NonFiniteEntry,
    encode_entry,
    entry_digest,
    verify_entry,
)
from expertune.data.file_index import FileIndex, FileStamp, listing_version
from expertune.io_utils import append_bytes, atomic_write_bytes, file_mode, storage_error

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the meaning of stored entries changes: every key changes with it

_KEY = re.compile(r"[0-9a-f]{64}")
_CONFIG_KEYS_IGNORED = frozenset(
    # Names, versions and run-time switches that do not change what the weights compute.
    {
        "transformers_version", "dtype", "torch_dtype", "output_hidden_states", "output_attentions",
        "return_dict", "use_cache",
    }
)


JOURNAL_NAME = "writes.log"
VERIFIED_NAME = "verified.jsonl"  # in a store's root: the shard folders last verified whole (see CacheStore.missing)
VERIFIED_KIND = "verified_shard"  # its FileIndex kind: {"damaged": [keys whose entry failed the check]}
ENTRY_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class CacheStats:
    """What one `ensure` did: distinct entries written (`encoded`), found intact (`reused`), and the
    inputs that could not be encoded, with the reason (`failed`: (path or caption, reason) pairs)."""

    encoded: int
    reused: int
    failed: tuple[tuple[str, str], ...] = ()


def _canonical_json(value: Any) -> str:
    def refuse(item: Any) -> Any:
        raise TypeError(f"cache key parts must be JSON values (str, int, float, bool, None, list, dict); got {item!r}")

    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=refuse
    )


def cache_key(kind: str, parts: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of {kind, parts, format_version}; tuples count as lists."""
    payload = {"kind": kind, "parts": dict(parts), "format_version": FORMAT_VERSION}
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


def cache_key_template(kind: str, parts: Mapping[str, Any], varying: str) -> Callable[[Any], str]:
    """`lambda value: cache_key(kind, {**parts, varying: value})` — the same keys — with the canonical JSON of
    everything but the value made once (a warm restart keys every caption of a dataset)."""
    marker = "\ue000expertune-varying-part\ue000"
    text = _canonical_json({"kind": kind, "parts": {**parts, varying: marker}, "format_version": FORMAT_VERSION})
    head, token, tail = text.partition(_canonical_json(marker))
    if not token or token in tail:
        raise ValueError(f"cache key parts of kind {kind!r} must not hold the text {marker!r}")
    prefix, suffix = hashlib.sha256(head.encode("utf-8")), tail.encode("utf-8")

    def key(value: Any) -> str:
        hasher = prefix.copy()
        hasher.update(_canonical_json(value).encode("utf-8"))
        hasher.update(suffix)
        return hasher.hexdigest()

    return key


def _config_dict(module: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        key: value
        for key, value in as_dict.items()
        if not str(key).startswith("_") and key not in _CONFIG_KEYS_IGNORED
    }


def module_fingerprint(module: torch.nn.Module) -> str:
    """BLAKE2b of the class name, the config and every state_dict tensor (name, dtype, shape, bytes).

    Content only: the same weights loaded from two directories give the same fingerprint (names,
    paths and library versions in the config are left out).
    """
    hasher = hashlib.blake2b(digest_size=32)
    hasher.update(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    config = _config_dict(module)
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8") + b"\n")
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


def file_digest(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex of the file's bytes, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


class CacheStore:
    """Entries live at `root/<key[:2]>/<key>.safetensors`; `put` is the one write path."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        # entries this object wrote or proved: key -> (inode, size, mtime_ns, ctime_ns) of the file it proved
        self._verified: dict[str, tuple[int, int, int, int]] = {}

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        return Path(self._entry_path(key))

    def _entry_path(self, key: str) -> str:
        """`path_for` as a string (a warm restart asks this of every entry: no Path objects in between)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"cache keys are 64 lowercase hex digits (see cache_key); got {key!r}")
        return os.path.join(self.root, key[:2], key + ENTRY_SUFFIX)

    def _signature(self, stat: os.stat_result) -> tuple[int, int, int, int]:
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    def _read_verified(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The entry's (tensors, metadata), its bytes proven by `verify_entry` unless this process proved this very
        file (inode, size, mtime, ctime) before; None when absent. A damaged entry is removed, with one warning
        naming it (an entry of an older expertune, without a digest, with an info line), and is None."""
        path = self._entry_path(key)
        proven = self._verified.get(key)
        if proven is not None:  # proven by this process: read it as it is, if it is still that very file
            try:
                if self._signature(os.stat(path)) == proven:
                    with safe_open(path, framework="pt", device="cpu") as handle:
                        metadata = dict(handle.metadata() or {})
                        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                    if self._signature(os.stat(path)) == proven:
                        metadata.pop(DIGEST_FIELD, None)
                        return tensors, metadata
            except (OSError, SafetensorError, ValueError, RuntimeError):
                pass  # replaced or gone meanwhile: read and prove it below
        try:
            with open(path, "rb", buffering=0) as stream:
                signature = self._signature(os.fstat(stream.fileno()))
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cache entry %s cannot be read (%s); it will be rewritten", path, exc)
            return None
        try:
            tensors, metadata = verify_entry(data)
        except DamagedEntry as damage:
            self._remove_damaged(path, signature, str(damage))
            return None
        self._verified[key] = signature
        metadata.pop(DIGEST_FIELD, None)
        return tensors, metadata

    def _remove_damaged(self, path: str, signature: tuple[int, int, int, int], reason: str) -> None:
        """Remove a damaged entry (unless another process has replaced it meanwhile), so it is rebuilt."""
        old = reason == NO_DIGEST
        try:
            if self._signature(os.stat(path))[0] == signature[0]:
                os.unlink(path)
        except OSError:
            pass
        if old:
            logger.info("cache entry %s was written without a digest (an older expertune); removed, it will be "
                        "rebuilt", path)
        else:
            logger.warning("cache entry %s is damaged (%s); removed, it will be rebuilt", path, reason)

    def contains(self, key: str) -> bool:
        """Whether an intact entry exists: its bytes proven by its digest and finite (`verify_entry`), once per
        process per file. A damaged entry counts as absent, and is removed with one warning naming it."""
        return self._read_verified(key) is not None

    def missing(self, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` without an intact entry: `contains` of each, answered a shard folder at a time.

        A warm restart asks this of every entry, so a folder whose listing — every entry's name, size and mtime —
        is the one last verified whole is answered from that listing alone (one `stat` an entry, nothing opened).
        Any other folder has every entry checked as `contains` does (digest and finite values), and is remembered
        so in `<root>/verified.jsonl` (a FileIndex: shared by every job of the store, a cache only). The listing
        holds each entry's inode, size, mtime and ctime: any write, rename, truncation or removal changes it — an
        edit that restores size and mtime still moves the ctime, which no one can set back.
        `fill_entries` still checks each entry it claims with `contains` itself.
        """
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            self._entry_path(key)  # a malformed key is refused here, as `contains` refuses it
            by_shard.setdefault(key[:2], []).append(key)
        if not by_shard:
            return set()
        index = FileIndex(self.root / VERIFIED_NAME)
        absent: set[str] = set()
        for shard, wanted in by_shard.items():
            folder = os.path.join(self.root, shard)
            try:
                with os.scandir(folder) as listing:
                    entries = {entry.name[:-len(ENTRY_SUFFIX)]: entry.stat() for entry in listing
                               if entry.name.endswith(ENTRY_SUFFIX) and _KEY.fullmatch(entry.name[:-len(ENTRY_SUFFIX)])}
            except FileNotFoundError:
                absent.update(wanted)
                continue
            except OSError:  # an unreadable folder: each entry as `contains` sees it
                absent.update(key for key in wanted if not self.contains(key))
                continue
            stamp = FileStamp(os.path.abspath(folder), len(entries), listing_version(
                ["\t".join(map(str, (key, *self._signature(stat)))) for key, stat in entries.items()]))
            remembered = index.get(VERIFIED_KIND, stamp)
            damaged = remembered.get("damaged") if remembered is not None else None
            if not isinstance(damaged, list):
                damaged = [key for key, stat in sorted(entries.items())
                           if self._verified.get(key) != self._signature(stat) and not self.contains(key)]
                index.put(VERIFIED_KIND, stamp, {"damaged": damaged})
            bad = set(damaged)
            absent.update(key for key in wanted if key not in entries or key in bad)
        index.flush()
        return absent

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata), or None when the entry is absent or damaged (then removed, with a warning).

        The bytes are proven by the entry's digest, and its values finite, the first time this process reads
        this file; later reads of the unchanged file (inode, size, mtime, ctime) skip the check."""
        self._entry_path(key)
        return self._read_verified(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the entry atomically (a temporary file in the same folder, then os.replace) and journal it.

        The entry carries its digest (`DIGEST_FIELD`); NonFiniteEntry when a tensor holds NaN or infinity (nothing
        is written). To avoid encoding twice what another process is encoding, hold the entry's `lock` around
        the check, the encoding and the put (`fill_entries` does). A full disk raises StorageError.
        """
        path = self.path_for(key)
        atomic_write_bytes(path, encode_entry(tensors, metadata))
        self._verified[key] = self._signature(os.stat(path))  # intact while it is this very file
        self._journal(key)

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL_NAME

    def _journal(self, key: str) -> None:
        line = f"{key} {os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode()
        append_bytes(self.journal_path, line)  # one short O_APPEND write: lines of concurrent writers never interleave

    def journal(self) -> list[str]:
        """The keys written to this store, one per write, oldest first (see the module doc)."""
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [line.split(" ", 1)[0] for line in text.splitlines() if line.strip()]

    @overload
    def lock(self, key: str, *, blocking: Literal[True] = True) -> EntryLock: ...

    @overload
    def lock(self, key: str, *, blocking: bool) -> EntryLock | None: ...

    def lock(self, key: str, *, blocking: bool = True) -> EntryLock | None:
        """Exclusive lock of one entry (`<key>.lock` beside it); None when `blocking` is False and it is held."""
        path = self.path_for(key).with_suffix(".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise storage_error(path, exc) or exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return EntryLock(path, fd)


class EntryLock:
    """A held entry lock. `release(done=True)` once the entry exists also removes the lock file."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self, *, done: bool) -> None:
        if self._fd < 0:
            return
        try:
            if done:  # remove our lock file, unless another process already replaced it by a new one
                try:
                    if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                        os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------------------------------
# Filling missing entries, several processes at once

T = TypeVar("T")
Encoded = tuple[dict[str, torch.Tensor], dict[str, str]]


@dataclass
class Pending(Generic[T]):
    """One entry to make: its key, the stores that lack it, what to encode, and a batching group."""

    key: str
    stores: tuple[CacheStore, ...]
    item: T
    group: Any = None  # only items of one group are encoded in one batch (e.g. one latent size)


@dataclass
class FillResult(Generic[T]):
    written: int = 0  # (store, key) entries written by this call
    found: int = 0  # (store, key) entries another process wrote while this one waited
    failed: list[tuple[T, str]] = field(default_factory=list)


def _release_all(locks: list[EntryLock], done: bool) -> None:
    for held in locks:
        held.release(done=done)


def _try_lock(entry: Pending[T]) -> list[EntryLock] | None:
    """Every lock of `entry` without waiting, or None (and nothing held) when another process holds one."""
    locks: list[EntryLock] = []
    for store in entry.stores:
        held = store.lock(entry.key, blocking=False)
        if held is None:
            _release_all(locks, done=False)
            return None
        locks.append(held)
    return locks


class _Filler(Generic[T]):
    """The batch being gathered by `fill_entries`, and what it found, wrote and could not encode."""

    def __init__(self, batch_size: int, encode: Callable[[list[T]], list[Encoded | str]], progress: Any) -> None:
        self.batch_size = batch_size
        self.encode = encode
        self.progress = progress
        self.result: FillResult[T] = FillResult()
        self.batch: list[tuple[Pending[T], list[EntryLock]]] = []

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def claimed(self, entry: Pending[T], locks: list[EntryLock]) -> None:
        """With every lock of `entry` held: count it as found, or queue it for encoding."""
        lacking = tuple(store for store in entry.stores if not store.contains(entry.key))
        self.result.found += len(entry.stores) - len(lacking)
        if not lacking:
            _release_all(locks, done=True)
            self.advance()
            return
        if self.batch and (len(self.batch) >= self.batch_size or self.batch[0][0].group != entry.group):
            try:
                self.flush()
            except BaseException:  # a full disk, say: this entry's locks are in no batch yet
                _release_all(locks, done=False)
                raise
        self.batch.append((Pending(entry.key, lacking, entry.item, entry.group), locks))

    def flush(self) -> None:
        if not self.batch:
            return
        taken = list(self.batch)
        self.batch.clear()
        try:
            outputs = self.encode([entry.item for entry, _ in taken])
            if len(outputs) != len(taken):
                raise RuntimeError(f"encode returned {len(outputs)} results for {len(taken)} items")
            for (entry, locks), output in zip(taken, outputs):
                if isinstance(output, str):
                    self.result.failed.append((entry.item, output))
                    _release_all(locks, done=False)
                else:
                    tensors, metadata = output
                    try:
                        for store in entry.stores:
                            store.put(entry.key, tensors, metadata)
                            self.result.written += 1
                    except NonFiniteEntry as refused:
                        self.result.failed.append((entry.item, f"not cached: {refused}"))
                        _release_all(locks, done=False)
                    else:
                        _release_all(locks, done=True)
                self.advance()
        finally:
            for _, locks in taken:
                _release_all(locks, done=False)  # no-op for the ones released above

    def release_pending(self) -> None:
        for _, locks in self.batch:
            _release_all(locks, done=False)


def fill_entries(
    pending: Sequence[Pending[T]],
    *,
    batch_size: int,
    encode: Callable[[list[T]], list[Encoded | str]],
    progress: Any = None,
) -> FillResult[T]:
    """Encode and store every pending entry exactly once across all processes sharing the stores.

    `encode` gets up to `batch_size` items of one group and returns, per item, (tensors, metadata)
    or a string saying why that item cannot be encoded (recorded in `failed`, nothing written).
    Entries locked by another process are skipped at first and waited for at the end, without
    holding any lock while waiting. `progress` (a tqdm bar or None) advances by one per entry.
    """
    filler: _Filler[T] = _Filler(batch_size, encode, progress)
    todo = every = [Pending(e.key, tuple(sorted(e.stores, key=lambda s: str(s.root))), e.item, e.group)
                    for e in pending]
    try:
        while todo:
            waiting: list[Pending[T]] = []
            for entry in todo:
                locks = _try_lock(entry)
                if locks is None:
                    waiting.append(entry)
                else:
                    filler.claimed(entry, locks)
            filler.flush()
            if waiting and len(waiting) == len(todo):
                # Every remaining entry is being made by someone else: wait for one, holding nothing.
                first, waiting = waiting[0], waiting[1:]
                filler.claimed(first, [store.lock(first.key) for store in first.stores])
                filler.flush()
            todo = waiting
    finally:
        filler.release_pending()
    _remember_verified(every)
    return filler.result


def _remember_verified(entries: Sequence[Pending[Any]]) -> None:
    """Remember the shard folders `entries` were written to as verified whole (`CacheStore.missing`), so the
    first restart after a cold run opens none of their entries (this process's own writes need no check)."""
    keys: dict[CacheStore, list[str]] = {}
    for entry in entries:
        for store in entry.stores:
            keys.setdefault(store, []).append(entry.key)
    for store, written in keys.items():
        store.missing(written)
