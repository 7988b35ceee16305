"""The local mirror of an `aws` entry's objects: each image fetched once, and known to be the listed version.

An object is fetched to its record's `path` (`<cache dir>/objects/<bucket>/<key>`) only when its bytes
are needed (`prepare_data` and `audit` decide when). A mirrored file is trusted only when the file
index holds, under the file's own stamp (path, size, mtime), the ETag it was fetched at, and that ETag
is the one the listing gave: a file left by an older version of the object — even one of the same
size — is fetched again, never hashed in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from expertune.data.dataloader import DatasetSpec
from expertune.data.paths import UnsafePath
from expertune.data.file_index import FileIndex, local_stamp
from expertune.data.records import ImageRecord
from expertune.data.remote import RemoteObject, S3Dataset

logger = logging.getLogger(__name__)

MIRROR_KIND = "mirror"  # FileIndex kind: {"etag": ...} under the mirrored file's local stamp


def is_current(record: ImageRecord, index: FileIndex) -> bool:
    """Whether `record`'s mirrored file holds exactly the listed version of its object."""
    if record.stamp is None:
        return False
    try:
        stamp = local_stamp(record.path)
    except OSError:
        return False
    value = index.get(MIRROR_KIND, stamp)
    return value is not None and value.get("etag") == record.stamp.version and stamp.size == record.stamp.size


def fetch_records(spec: DatasetSpec, records: Sequence[ImageRecord], index: FileIndex) -> dict[str, str]:
    """Fetch every record's object that is not mirrored at its listed version: {key: reason} of failures.

    Each object goes to `S3Dataset.local_path` of its key (the one place that maps keys to paths); a record
    whose path is not that one is refused, not written. A full disk raises StorageError (exit 3)."""
    jobs = []
    failures: dict[str, str] = {}
    bucket = S3Dataset(spec)
    for record in records:
        if record.remote_key is None or record.stamp is None or is_current(record, index):
            continue
        try:
            path = bucket.local_path(record.remote_key)
        except UnsafePath as error:
            failures[record.remote_key] = f"object {record.stamp.identity} is not mirrored: {error}"
            continue
        if path != record.path:
            failures[record.remote_key] = f"object {record.stamp.identity} belongs at {path}, not {record.path}"
            continue
        jobs.append((record, RemoteObject(record.remote_key, record.stamp.size, record.stamp.version)))
    if not jobs:
        return failures
    assert spec.remote is not None
    logger.info("dataset %r: fetching %d objects from %s", spec.id, len(jobs), spec.remote.url(spec.remote.prefix))
    failures.update(bucket.fetch_many((obj.key, obj) for _, obj in jobs))
    for record, obj in jobs:
        if obj.key not in failures:
            index.put(MIRROR_KIND, local_stamp(record.path), {"etag": obj.etag})
    return failures
