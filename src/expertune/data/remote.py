"""S3-compatible buckets (`"type": "aws"` dataset entries) through boto3: listing, reading, fetching.

- **Listing** is boto's paginator (1,000 keys a page), yielded object by object: a bucket is listed
  once and never held twice in memory. The prefix's sub-prefixes ("folders") are listed concurrently.
- **Requests** are retried by botocore (`standard` mode: throttling, 5xx, dropped connections, with
  exponential backoff and jitter); a body that breaks off while it streams — which botocore does not
  retry — is fetched again here, with backoff, up to `READ_ATTEMPTS` times.
- **Downloads** run `DOWNLOAD_WORKERS` at a time, each streamed to disk a chunk at a time and renamed into
  place (`io_utils.atomic_writer`): a reader sees a whole object or no file, never part of one. An object
  whose length differs from what the server announced, or whose ETag is not the listed one, is a failed
  read, not a file; one over `aws_max_object_bytes` (default 256 MiB) is skipped unread. Where it goes is
  `paths.contained_path` of its key: a key that would leave the mirror, or cannot be a file, is skipped.
- **Errors** a user must fix (no such bucket, access denied, bad credentials, endpoint unreachable) are a
  `DataError` naming the dataset entry, the bucket and the fix, raised by `check` before any training.
  A key that vanishes or cannot be read later is reported per key, and the image is skipped.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertune.data.dataloader import DatasetSpec, S3Location
from expertune.data.paths import UnsafePath, contained_path
from expertune.errors import DataError
from expertune.io_utils import atomic_writer

logger = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 16
LISTING_WORKERS = 8  # a prefix's sub-prefixes listed at once
LISTING_PAGE_SIZE = 1000  # keys a listing page (S3's most)
REQUEST_ATTEMPTS = 5  # botocore's total attempts per request (standard retry mode)
READ_ATTEMPTS = 4  # ours, for a body that breaks off mid-stream
READ_BACKOFF_S = 0.2  # first wait; doubled each attempt, with jitter
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60

STREAM_CHUNK_BYTES = 1 << 20  # an object is written to disk this much at a time
SMALL_OBJECT_BYTES = 1 << 20  # the most a caption file may hold: `read` keeps it in memory

_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"})


class _ShortBody(Exception):
    """A body that broke off while it streamed: read again."""


class _Oversize(Exception):
    """A body longer than announced or than aws_max_object_bytes: skipped."""


@dataclass(frozen=True)
class RemoteObject:
    """One listed object: its full key, size in bytes and ETag (quotes removed)."""

    key: str
    size: int
    etag: str


def _page_objects(page: dict[str, Any]) -> Iterator[RemoteObject]:
    for item in page.get("Contents", ()):
        key = item["Key"]
        if not key.endswith("/"):  # else a "folder" placeholder
            yield RemoteObject(key=key, size=int(item["Size"]), etag=str(item.get("ETag", "")).strip('"'))


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3Dataset:
    """The bucket of one `aws` dataset entry; thread-safe (one boto3 client, shared by the workers)."""

    def __init__(self, spec: DatasetSpec, *, client: Any = None) -> None:
        if spec.remote is None:
            raise ValueError(f"dataset {spec.id!r} is not an aws entry")
        self.spec = spec
        self.location: S3Location = spec.remote
        self.client = client if client is not None else self._client()

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        location = self.location
        session = boto3.session.Session(
            aws_access_key_id=location.access_key_id,
            aws_secret_access_key=location.secret_access_key,
            region_name=location.region,
        )
        config = BotoConfig(
            retries={"max_attempts": REQUEST_ATTEMPTS, "mode": "standard"},
            max_pool_connections=DOWNLOAD_WORKERS,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            s3={"addressing_style": "path"} if location.endpoint_url else None,
        )
        return session.client("s3", endpoint_url=location.endpoint_url, config=config)

    # ---- errors ----------------------------------------------------------------------------------

    def _describe(self) -> str:
        where = f" at {self.location.endpoint_url}" if self.location.endpoint_url else ""
        return f"dataset {self.spec.id!r} (\"type\": \"aws\"): bucket {self.location.bucket!r}{where}"

    def fatal(self, exc: BaseException) -> DataError:
        """A DataError naming the entry, what went wrong, and the fix."""
        from botocore.exceptions import (
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        code = _error_code(exc)
        if code in ("NoSuchBucket",) or (code == "404" and "bucket" in str(exc).lower()):
            fix = "Fix \"aws_bucket_name\" (and \"aws_endpoint_url\" / \"aws_region_name\" if it lives elsewhere)."
            return DataError(f"{self._describe()} does not exist. {fix}")
        if code in _DENIED_CODES:
            return DataError(
                f"{self._describe()}: access denied ({exc}). Grant these credentials s3:ListBucket and "
                "s3:GetObject on the bucket, or give others (\"aws_access_key_id\" / \"aws_secret_access_key\", "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)."
            )
        if code in _CREDENTIAL_CODES:
            return DataError(
                f"{self._describe()}: the credentials were refused ({code}). Fix \"aws_access_key_id\" / "
                "\"aws_secret_access_key\" (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / ~/.aws/credentials)."
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return DataError(
                f"{self._describe()}: no credentials found. Set \"aws_access_key_id\" and "
                "\"aws_secret_access_key\" in the entry, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a "
                "profile in ~/.aws/credentials (AWS_PROFILE)."
            )
        if isinstance(exc, EndpointConnectionError) or type(exc).__name__ in (
            "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError", "ProxyConnectionError",
        ):
            return DataError(
                f"{self._describe()}: the endpoint cannot be reached ({exc}). Check \"aws_endpoint_url\" "
                "(scheme, host, port) and the network, or leave it out for AWS itself."
            )
        return DataError(f"{self._describe()}: {type(exc).__name__}: {exc}. Check the entry's aws_* fields.")

    # ---- listing ---------------------------------------------------------------------------------

    def check(self) -> None:
        """One cheap request (a single-key listing) that raises the entry's DataError if the bucket is unusable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=self.location.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self.fatal(exc) from None

    def list_objects(self) -> Iterator[RemoteObject]:
        """Every object under the entry's prefix, streamed a page at a time (in folder order, not key order).

        The prefix is listed one level deep first (delimiter "/"): the objects right under it, and its
        sub-prefixes ("folders"), which `LISTING_WORKERS` threads then list whole, several pages at once — a
        bucket laid out in folders (img2dataset's `00000/` shards, say) is listed that many times faster than
        one page after another. At most `2 * LISTING_WORKERS` pages wait in memory; a flat prefix is one
        paginated listing.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield from self._list_by_folder()
        except (ClientError, BotoCoreError) as exc:
            raise self.fatal(exc) from None

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        arguments: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix,
                                     "PaginationConfig": {"PageSize": LISTING_PAGE_SIZE}}
        if delimiter is not None:
            arguments["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**arguments)

    def _list_by_folder(self) -> Iterator[RemoteObject]:
        folders: list[str] = []
        for page in self._pages(self.location.prefix, delimiter="/"):
            yield from _page_objects(page)
            folders.extend(str(entry["Prefix"]) for entry in page.get("CommonPrefixes", ()))
        if not folders:
            return
        pages: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue(maxsize=2 * LISTING_WORKERS)
        stop = threading.Event()

        def list_folder(prefix: str) -> None:
            try:
                for page in self._pages(prefix):
                    if stop.is_set():
                        return
                    pages.put(page)
            except BaseException as exc:  # handed to the reader, who raises it
                pages.put(exc)
            finally:
                pages.put(None)  # one None a folder: it is done

        with ThreadPoolExecutor(min(LISTING_WORKERS, len(folders)), thread_name_prefix="expertune-list") as pool:
            for prefix in folders:
                pool.submit(list_folder, prefix)
            remaining = len(folders)
            try:
                while remaining:
                    item = pages.get()
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield from _page_objects(item)
            finally:  # stopped early or failed: let every folder's lister see `stop` and finish
                stop.set()
                while remaining:
                    if pages.get() is None:
                        remaining -= 1

    def head(self, key: str) -> RemoteObject | None:
        """The object's size and ETag without its bytes; None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_KEY_CODES:
                return None
            raise
        return RemoteObject(key=key, size=int(response["ContentLength"]), etag=str(response.get("ETag", "")).strip('"'))

    def head_many(self, keys: Iterable[str]) -> dict[str, RemoteObject | str | None]:
        """{key: its RemoteObject, None when it does not exist, or why it cannot be asked} (concurrent HEADs)."""
        from botocore.exceptions import BotoCoreError, ClientError

        keys = list(keys)

        def one(key: str) -> RemoteObject | str | None:
            try:
                return self.head(key)
            except (ClientError, BotoCoreError) as exc:
                return f"object {self.location.url(key)} cannot be asked for its size ({exc})"

        if not keys:
            return {}
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(keys))) as pool:
            return dict(zip(keys, pool.map(one, keys)))

    # ---- reading ---------------------------------------------------------------------------------

    def local_path(self, key: str) -> Path:
        """Where the object `key` is mirrored: `paths.contained_path` of its name below the prefix, under the
        entry's mirror folder; UnsafePath (naming why) for a key that would leave it or cannot be a file."""
        prefix = self.location.prefix
        if not key.startswith(prefix):
            raise UnsafePath(f"key {key!r} is not under the prefix {prefix!r}")
        return contained_path(self.spec.instance_data_dir, key[len(prefix):])

    def _attempts(self, key: str) -> Iterator[int]:
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(READ_BACKOFF_S * (2 ** (attempt - 1)) * (0.5 + random.random()))
            yield attempt

    def _get_object(self, key: str) -> dict[str, Any]:
        """GetObject; KeyError when the key does not exist, DataError when access is refused."""
        from botocore.exceptions import ClientError

        try:
            response: dict[str, Any] = self.client.get_object(Bucket=self.location.bucket, Key=key)
            return response
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_KEY_CODES:
                raise KeyError(key) from None
            if code in _DENIED_CODES | _CREDENTIAL_CODES:
                raise DataError(f"{self.location.url(key)}: {code} while reading ({exc}). Check the credentials' "
                                "s3:GetObject permission on this key.") from None
            raise

    def _too_large(self, key: str, size: int, cap: int | None = None) -> str | None:
        if cap is not None and size > cap:
            return (f"object {self.location.url(key)} is {size} bytes, over {cap} bytes (the most a caption file "
                    "may hold); it is not read")
        cap = self.location.max_object_bytes
        if size <= cap:
            return None
        return (f"object {self.location.url(key)} is {size} bytes, over the entry's aws_max_object_bytes ({cap}); "
                "it is not downloaded (raise aws_max_object_bytes to use it)")

    def read(self, key: str) -> tuple[bytes, str]:
        """(bytes, ETag) of one small object (a caption file, at most `SMALL_OBJECT_BYTES`, read into memory); a
        broken-off body is read again with backoff.

        Raises KeyError when the key does not exist (any more), DataError (naming the key) when it still
        cannot be read after every attempt or is larger than aws_max_object_bytes.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.location.url(key)
        last: BaseException | None = None
        for attempt in self._attempts(key):
            try:
                response = self._get_object(key)
                body = response["Body"]
                try:
                    expected = int(response.get("ContentLength", 0))
                    if (reason := self._too_large(key, expected, SMALL_OBJECT_BYTES)) is not None:
                        raise DataError(reason)
                    data = body.read(min(SMALL_OBJECT_BYTES, self.location.max_object_bytes) + 1)
                finally:
                    body.close()
                if (reason := self._too_large(key, len(data), SMALL_OBJECT_BYTES)) is not None:
                    raise DataError(reason)
                if len(data) != expected:
                    raise OSError(f"got {len(data)} of {expected} bytes")
                return data, str(response.get("ETag", "")).strip('"')
            except (ClientError, BotoCoreError, OSError) as exc:  # IncompleteRead, ResponseStreamingError, short
                last = exc
            logger.info("%s: read attempt %d of %d failed (%s)", url, attempt + 1, READ_ATTEMPTS, last)
        raise DataError(f"{url}: cannot be read after {READ_ATTEMPTS} attempts ({last}). Check the bucket and "
                        "the network; the image is skipped.")

    def fetch(self, key: str, expected: RemoteObject | None = None) -> str | None:
        """Stream `key` to its `local_path` atomically: None, or the reason the image must be skipped.

        The body goes to disk a chunk at a time (never whole in memory), is refused past aws_max_object_bytes,
        and is kept only when its length is the announced one and its ETag the listed one. A key that cannot
        be a file under the mirror, or a file that cannot be written there (a folder in the way, no permission),
        is a reason, never a write elsewhere. A full disk raises StorageError: the run stops (exit 3).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.location.url(key)
        try:
            target = self.local_path(key)
        except UnsafePath as error:
            return f"object {url} is not mirrored: {error}"
        if expected is not None and (reason := self._too_large(key, expected.size)) is not None:
            return reason
        last: BaseException | None = None
        for attempt in self._attempts(key):
            try:
                response = self._get_object(key)
            except KeyError:
                return f"object {url} no longer exists (it was deleted after the bucket was listed)"
            except DataError as error:
                return str(error).removeprefix(f"{url}: ")
            except (ClientError, BotoCoreError) as exc:
                last = exc
                continue
            body = response["Body"]
            try:
                etag = str(response.get("ETag", "")).strip('"')
                if expected is not None and expected.etag and etag and etag != expected.etag:
                    return (f"object {url} changed after the bucket was listed (ETag {expected.etag} -> {etag}); "
                            "the next run uses the new version")
                length = int(response.get("ContentLength", -1))
                if (reason := self._too_large(key, length)) is not None:
                    return reason
                return self._stream(url, body, target, length)
            except (BotoCoreError, _ShortBody) as exc:  # broke off mid-stream: again, with backoff
                last = exc
            finally:
                body.close()
            logger.info("%s: read attempt %d of %d failed (%s)", url, attempt + 1, READ_ATTEMPTS, last)
        return f"cannot be read after {READ_ATTEMPTS} attempts ({last}). Check the bucket and the network"

    def _stream(self, url: str, body: Any, target: Path, length: int) -> str | None:
        """Write `body` to `target` through `atomic_writer`: None, or why it cannot be kept (`_ShortBody` for a
        body that broke off, to be read again)."""
        cap = self.location.max_object_bytes
        streaming = False
        try:
            with atomic_writer(target) as stream:
                streaming = True
                got = 0
                for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                    got += len(chunk)
                    if got > cap:
                        raise _Oversize(f"object {url} grew past aws_max_object_bytes ({cap}) while it was read")
                    if length >= 0 and got > length:
                        raise _Oversize(f"object {url} sent more than its announced {length} bytes")
                    stream.write(chunk)
                streaming = False
                if length >= 0 and got != length:
                    raise _ShortBody(f"got {got} of {length} bytes")
        except _Oversize as error:
            return str(error)
        except OSError as exc:
            if streaming and not isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)) \
                    and exc.errno not in (errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST):
                raise _ShortBody(str(exc)) from None  # the connection, not the disk
            return f"object {url} cannot be written to {target} ({exc.strerror or exc}); skipped"
        return None

    def fetch_many(self, jobs: Iterable[tuple[str, RemoteObject | None]]) -> dict[str, str]:
        """Download every (key, expected) job, `DOWNLOAD_WORKERS` at a time: {key: reason} of failures.
        A full disk (StorageError) stops them all and is raised."""
        jobs = list(jobs)
        if not jobs:
            return {}
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(jobs)),
                                thread_name_prefix=f"s3-{self.spec.id}") as pool:
            try:
                for (key, _), reason in zip(jobs, pool.map(lambda job: self.fetch(*job), jobs)):
                    if reason is not None:
                        failures[key] = reason
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return failures

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | str]:
        """{key: bytes} of small objects (caption files) read concurrently; a failed key maps to its reason."""
        keys = list(keys)

        def one(key: str) -> bytes | str:
            try:
                return self.read(key)[0]
            except KeyError:
                return f"object {self.location.url(key)} no longer exists (deleted after the bucket was listed)"
            except DataError as error:
                return str(error)

        if not keys:
            return {}
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(keys))) as pool:
            return dict(zip(keys, pool.map(one, keys)))
