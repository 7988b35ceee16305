"""Records from a catalogue instead of a walk: an `aws` entry's bucket listing, or a manifest file's rows.

Both pair each image with its captions as `records.discover_records` does for a folder (which calls them), and
both name where an object is mirrored through `S3Dataset.local_path` (`paths.contained_path`): a key that would
leave the mirror, cannot be a file, or is also another key's folder is skipped and listed, never fetched.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from expertune.data.dataloader import DatasetSpec
from expertune.data.file_index import FileIndex, FileStamp
from expertune.data.records import (
    IMAGE_EXTENSIONS,
    Discovery,
    ImageRecord,
    SkippedImage,
    _captions_from_textfile,
    _finish,
    _other_captions,
    _recalled,
    _remember,
    parse_captions,
)
from expertune.data.remote import RemoteObject as RemoteObjectType
from expertune.errors import DataError

logger = logging.getLogger(__name__)


def discover_remote(spec: DatasetSpec, index: FileIndex | None) -> Discovery:
    """An `aws` entry: one streamed listing of its prefix; caption files read concurrently, once."""
    from expertune.data.remote import RemoteObject, S3Dataset

    assert spec.remote is not None
    location = spec.remote
    bucket = S3Dataset(spec)
    bucket.check()
    images: list[RemoteObject] = []
    texts: dict[str, RemoteObject] = {}
    for obj in bucket.list_objects():
        name = obj.key[len(location.prefix):]
        if any(part.startswith(".") and part not in (".", "..") for part in name.split("/")):
            continue  # a hidden file or folder ('.' and '..' are refused below, and listed)
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(obj)
        elif suffix == ".txt" and spec.caption_strategy == "textfile":
            texts[obj.key] = obj
    found = len(images)
    records: list[ImageRecord] = []
    skipped: list[SkippedImage] = []
    images, paths = _mirrored(spec, bucket, images, skipped)

    captions_of: dict[str, tuple[tuple[str, ...], str | None]] = {}
    if spec.caption_strategy == "textfile":
        unread: dict[str, FileStamp] = {}
        for obj in images:
            text_key = str(PurePosixPath(obj.key).with_suffix(".txt"))
            text = texts.get(text_key)
            if text is None:
                captions_of[obj.key] = ((), f"caption file {location.url(text_key)} is missing")
                continue
            stamp = FileStamp(location.url(text_key), text.size, text.etag)
            recalled = _recalled(index, stamp)
            if recalled is not None:
                captions_of[obj.key] = recalled
            else:
                unread[obj.key] = stamp
        text_keys = {key: str(PurePosixPath(key).with_suffix(".txt")) for key in unread}
        contents = bucket.read_many(text_keys.values())
        for key, stamp in unread.items():
            content = contents[text_keys[key]]
            if isinstance(content, str):
                captions_of[key] = ((), content)  # vanished or unreadable: not remembered
            else:
                captions_of[key] = parse_captions(content, location.url(text_keys[key]))
                _remember(index, stamp, captions_of[key])

    for obj in images:
        path = paths[obj.key]
        captions, reason = captions_of[obj.key] if obj.key in captions_of else _other_captions(spec, path)
        if reason is not None:
            logger.warning("dataset %r: skipping %s: %s", spec.id, location.url(obj.key), reason)
            skipped.append(SkippedImage(path=path, reason=reason))
        else:
            stamp = FileStamp(location.url(obj.key), obj.size, obj.etag)
            records.append(ImageRecord(path=path, captions=captions, dataset_id=spec.id, stamp=stamp,
                                       remote_key=obj.key))
    records.sort(key=lambda record: record.path)
    return _finish(spec, records, skipped, found, location.url(location.prefix))


def _mirrored(spec: DatasetSpec, bucket: Any, images: list[RemoteObjectType], skipped: list[SkippedImage]
              ) -> tuple[list[RemoteObjectType], dict[str, Path]]:
    """The objects that can be mirrored, with their local paths (`S3Dataset.local_path`); the others — keys that
    would leave the mirror or cannot be a file, and a key that is also another's folder — go to `skipped`."""
    from expertune.data.paths import UnsafePath, clashing

    assert spec.remote is not None
    location = spec.remote
    kept: list[RemoteObjectType] = []
    paths: dict[str, Path] = {}
    for obj in images:
        try:
            paths[obj.key] = bucket.local_path(obj.key)
            kept.append(obj)
        except UnsafePath as error:
            reason = f"object key {obj.key!r} is not mirrored: {error}"
            logger.warning("dataset %r: skipping %s: %s", spec.id, location.url(obj.key), reason)
            skipped.append(SkippedImage(path=Path(location.url(obj.key)), reason=reason))
    folders = clashing(obj.key for obj in kept)
    for obj in kept:
        if obj.key in folders:
            reason = f"object key {obj.key!r} is also a folder of other keys; only one of them can be a file"
            logger.warning("dataset %r: skipping %s: %s", spec.id, location.url(obj.key), reason)
            skipped.append(SkippedImage(path=paths[obj.key], reason=reason))
    return [obj for obj in kept if obj.key not in folders], paths


def from_manifest(spec: DatasetSpec, index: FileIndex | None) -> Discovery:
    """A dataset with a manifest: its rows, without walking or listing; for a bucket, each object's size
    and ETag by a HEAD request (no bytes), which also finds the keys that do not exist."""
    from expertune.data.manifest import read_manifest

    assert spec.manifest is not None
    rows = read_manifest(spec.manifest, remote=spec.remote is not None)
    records: list[ImageRecord] = []
    skipped: list[SkippedImage] = []
    heads: dict[str, Any] = {}
    texts: dict[str, bytes | str] = {}
    if spec.remote is not None:
        from expertune.data.remote import S3Dataset

        bucket = S3Dataset(spec)
        bucket.check()
        keys = [spec.remote.prefix + row.path for row in rows]
        heads = bucket.head_many(key for key in keys if _mirrorable(bucket, key))
        if spec.caption_strategy == "textfile":
            texts = bucket.read_many(str(PurePosixPath(key).with_suffix(".txt"))
                                     for key, row in zip(keys, rows) if row.captions is None and heads.get(key))
    for row in rows:
        path = Path(row.path) if Path(row.path).is_absolute() else spec.instance_data_dir / row.path
        declared = (row.height, row.width) if row.width and row.height else None
        stamp, key = None, None
        reason: str | None = None
        if spec.remote is not None:
            key = spec.remote.prefix + row.path
            head = heads.get(key)
            try:
                path = bucket.local_path(key)
            except DataError as error:  # paths.UnsafePath: never fetched, never written
                path, reason = Path(spec.remote.url(key)), f"object key {key!r} is not mirrored: {error}"
            if isinstance(head, RemoteObjectType):
                stamp = FileStamp(spec.remote.url(key), head.size, head.etag)
            elif reason is None:
                reason = head if isinstance(head, str) else f"object {spec.remote.url(key)} does not exist"
        if reason is None:
            if row.captions is not None:
                captions: tuple[str, ...] = row.captions
            elif spec.caption_strategy == "textfile" and key is not None and spec.remote is not None:
                text_key = str(PurePosixPath(key).with_suffix(".txt"))
                content = texts.get(text_key, "")
                captions, reason = ((), content or f"caption file {spec.remote.url(text_key)} is missing") \
                    if isinstance(content, str) else parse_captions(content, spec.remote.url(text_key))
            elif spec.caption_strategy == "textfile":
                captions, reason = _captions_from_textfile(path, index)
            else:
                captions, reason = _other_captions(spec, path)
        if reason is not None:
            reason = f"{reason} (manifest {spec.manifest.name} line {row.line})"
            logger.warning("dataset %r: skipping %s: %s", spec.id, path, reason)
            skipped.append(SkippedImage(path=path, reason=reason))
        else:
            records.append(ImageRecord(path=path, captions=captions, dataset_id=spec.id, stamp=stamp,
                                       remote_key=key, declared_size=declared))
    records.sort(key=lambda record: record.path)
    return _finish(spec, records, skipped, len(rows), str(spec.manifest))


def _mirrorable(bucket: Any, key: str) -> bool:
    try:
        bucket.local_path(key)
    except DataError:
        return False
    return True
