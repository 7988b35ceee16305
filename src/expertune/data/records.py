"""The image records of one dataset: every image of its directory paired with its captions.

`discover_records` walks one dataset's directory (a `DatasetSpec` of `data.dataloader`), or lists its
bucket or reads its manifest (`data.catalog`), and pairs every image with its captions; what it leaves out is
logged and returned with the reason. Caption files are read once: their text is kept in the persistent
`FileIndex` under the file's stamp, and all of a local folder's captions under its listing
(`FolderListing`, `FileIndex.folders`). See docs/datasets.md and docs/storage.md.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from expertune.data.dataloader import CAPTION_STRATEGIES, DatasetSpec
from expertune.data.file_index import (
    FileIndex,
    FileStamp,
    FolderEntries,
    listing_version,
    local_stamp,
    stamp_version,
)
from expertune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # local file; for an `aws` entry, where its object is (or will be) fetched to
    captions: tuple[str, ...]
    dataset_id: str
    stamp: FileStamp | None = None  # from the walk or the listing (size and mtime, or an ETag); None: stat `path`
    remote_key: str | None = None  # the object key of an `aws` entry's image
    declared_size: tuple[int, int] | None = None  # (h, w) a manifest gives; the file's header decides
    listing: FileStamp | None = None  # the walk's `FolderListing.images` of its folder: whole-folder index entries


class SkippedImage(NamedTuple):
    """An image `discover_records` left out, and why (already logged); unpacks as (path, reason)."""

    path: Path
    reason: str


class Discovery(NamedTuple):
    """What `discover_records` found: `records, skipped = discover_records(spec)`."""

    records: list[ImageRecord]
    skipped: list[SkippedImage]


# --------------------------------------------------------------------------------------------------
# Records


class FolderListing(NamedTuple):
    """What one folder's listing says of its images, as two stamps whose identity is the folder's absolute path
    and whose version digests every image's name, size and mtime (`images`), or every image's name with its
    caption file's size and mtime (`captions`): one index entry keyed by such a stamp stands for the whole folder
    (`FileIndex.folders`), and any edit, addition or removal in the folder changes it."""

    images: FileStamp
    captions: FileStamp


class _Listed(NamedTuple):
    """One image file found by the walk, with what the walk's directory listing already tells about it."""

    path: str
    stamp: FileStamp | None  # None when it cannot be stat'ed (a dangling link): reading it will say why
    caption_stamp: FileStamp | None  # the sibling `<stem>.txt`'s stamp; None when the listing has none
    folder: FolderListing
    name: str


def _entry_stamp(identity: str, entry: os.DirEntry) -> FileStamp | None:
    try:
        stat = entry.stat()  # follows a link, as os.stat does
    except OSError:
        return None
    return FileStamp(identity, stat.st_size, stamp_version(stat))


def _stamp_line(name: str, stamp: FileStamp | None) -> str:
    return f"{name}\t-" if stamp is None else f"{name}\t{stamp.size}\t{stamp.version}"


def shown_name(path: str | os.PathLike) -> str:
    """A path as text anyone can print and store: bytes that are not UTF-8 as backslash escapes (\\xff)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _undecodable(name: str) -> bool:
    """Whether a name from the file system is not UTF-8 (Python holds its bytes as surrogate escapes)."""
    if name.isascii():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _walk_images(directory: Path, undecodable: list[str] | None = None) -> list[_Listed]:
    """Images under `directory`, recursively, following links once; hidden names are skipped.

    One `scandir` a folder and one `stat` a file (the image's and its caption's stamps, as `local_stamp`
    gives them, and each folder's `FolderListing`), so a restart over an unchanged dataset costs a listing
    and the index lookups, nothing more.

    A file or folder whose name is not UTF-8 (a byte 0xff, say) is left out with a warning naming it (escaped),
    and added to `undecodable` (its path as `shown_name` gives it): the caches, the index and run.json hold
    only text names.
    """
    found: list[_Listed] = []
    visited: set[str] = set()
    pending = [os.fspath(directory)]
    while pending:
        root = pending.pop()
        real = os.path.realpath(root)
        if real in visited:  # a symlink cycle or a second link to the same folder
            continue
        visited.add(real)
        try:
            with os.scandir(root) as listing:
                entries = {entry.name: entry for entry in listing if entry.name[0] != "."}
        except OSError:
            continue  # as os.walk: an unreadable folder holds nothing
        for name in [name for name in entries if _undecodable(name)]:
            shown = shown_name(os.path.join(root, name))
            logger.warning("skipping %s: its name is not UTF-8; rename it (e.g. with convmv) to use it", shown)
            if undecodable is not None:
                undecodable.append(shown)
            del entries[name]
        prefix = root + os.sep if not root.endswith(os.sep) else root
        absolute = prefix if os.path.isabs(root) else os.path.abspath(root) + os.sep
        folders = []
        images: list[tuple[str, FileStamp | None, FileStamp | None]] = []
        for name, entry in entries.items():
            try:
                is_folder = entry.is_dir()  # from the listing; follows a link
            except OSError:
                is_folder = False
            dot = name.rfind(".")
            if is_folder:
                folders.append(prefix + name)
            elif dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS:
                caption = entries.get(name[:dot] + ".txt")
                images.append((name, _entry_stamp(absolute + name, entry),
                               None if caption is None else _entry_stamp(absolute + caption.name, caption)))
        if images:
            identity = absolute.rstrip(os.sep) or os.sep
            folder = FolderListing(
                images=FileStamp(identity, len(images), listing_version([_stamp_line(n, s) for n, s, _ in images])),
                captions=FileStamp(identity, len(images), listing_version([_stamp_line(n, c) for n, _, c in images])))
            found.extend(_Listed(prefix + name, stamp, caption, folder, name) for name, stamp, caption in images)
        pending.extend(sorted(folders, reverse=True))
    found.sort(key=lambda listed: listed.path.split(os.sep))  # the order of Path's own comparison, part by part
    return found


def _image_paths(directory: Path) -> list[Path]:
    """Images under `directory`, recursively, following links once; hidden names are skipped."""
    return [Path(listed.path) for listed in _walk_images(directory)]


def _caption_from_filename(path: Path) -> str:
    return " ".join(re.sub(r"[_-]", " ", path.stem).split())


CAPTION_KIND = "caption"  # FileIndex kind: {"lines": [...]} or {"reason": "..."}


def parse_captions(data: bytes, where: str) -> tuple[tuple[str, ...], str | None]:
    """(captions, None) or ((), reason) of a caption file's bytes: one caption per non-blank line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return (), f"caption file {where} is not UTF-8 ({exc.reason} at byte {exc.start})"
    captions = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not captions:
        return (), f"caption file {where} is empty"
    return captions, None


def _remember(index: FileIndex | None, stamp: FileStamp, result: tuple[tuple[str, ...], str | None]) -> None:
    if index is not None:
        captions, reason = result
        index.put(CAPTION_KIND, stamp, {"lines": list(captions)} if reason is None else {"reason": reason})


def _recalled(index: FileIndex | None, stamp: FileStamp) -> tuple[tuple[str, ...], str | None] | None:
    value = index.get(CAPTION_KIND, stamp) if index is not None else None
    if value is None:
        return None
    if "reason" in value:
        return (), str(value["reason"])
    return tuple(str(line) for line in value.get("lines", ())), None


def _captions_from_textfile(path: Path | str, index: FileIndex | None = None, stamp: FileStamp | None = None
                            ) -> tuple[tuple[str, ...], str | None]:
    """(captions, None) or ((), reason) for the sibling `<stem>.txt` of `path` (from `index` when unchanged).

    `stamp`: the caption file's stamp when the caller's directory listing already has it (else one `stat`).
    """
    caption_file = os.path.splitext(os.fspath(path))[0] + ".txt"
    if stamp is None:
        try:
            stamp = local_stamp(caption_file)
        except FileNotFoundError:
            return (), f"caption file {caption_file} is missing"
        except OSError as exc:
            return (), f"caption file {caption_file} cannot be read ({exc.strerror or exc})"
    recalled = _recalled(index, stamp)
    if recalled is not None:
        return recalled
    try:
        data = Path(caption_file).read_bytes()
    except FileNotFoundError:
        return (), f"caption file {caption_file} is missing"
    except OSError as exc:
        return (), f"caption file {caption_file} cannot be read ({exc.strerror or exc})"
    result = parse_captions(data, caption_file)
    _remember(index, stamp, result)
    return result


def _other_captions(spec: DatasetSpec, path: Path) -> tuple[tuple[str, ...], str | None]:
    """Captions of the filename and instanceprompt strategies (no file to read)."""
    if spec.caption_strategy == "filename":
        caption = _caption_from_filename(path)
        return ((caption,), None) if caption else ((), f"file name {path.name} gives an empty caption")
    if spec.caption_strategy == "instanceprompt":
        assert spec.instance_prompt is not None
        return (spec.instance_prompt,), None
    raise ConfigError(  # load_dataloader_config rejects these; a hand-built spec may not
        f"dataset {spec.id!r}: caption_strategy {spec.caption_strategy!r} is not supported. "
        f"Use one of {', '.join(CAPTION_STRATEGIES)}."
    )


def _finish(spec: DatasetSpec, records: list[ImageRecord], skipped: list[SkippedImage], found: int,
            where: str) -> Discovery:
    if not found:
        raise DataError(
            f"dataset {spec.id!r}: {where} has no usable image: no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) found. Add images or fix "
            f"{'aws_bucket_name / aws_data_prefix' if spec.remote is not None else 'instance_data_dir'}."
        )
    if not records:
        logger.warning(
            "dataset %r: all %d images in %s were skipped (first: %s: %s)",
            spec.id, found, where, skipped[0].path, skipped[0].reason,
        )
    return Discovery(records=records, skipped=skipped)


def read_exclusions(path: Path) -> frozenset[str]:
    """The entries of an exclude file: one image per line (a path, or an `s3://` URL); `#` lines are comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the exclude file ({exc}). Fix the entry's \"exclude_file\".") from None
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def exclusion_names(spec: DatasetSpec, record: ImageRecord) -> tuple[str, ...]:
    """The names an exclude file may use for `record`: its path, its path relative to the dataset, its URL."""
    names = [str(record.path)]
    try:
        names.append(record.path.relative_to(spec.instance_data_dir).as_posix())
    except ValueError:
        pass
    if record.stamp is not None and record.stamp.identity.startswith("s3://"):
        names.append(record.stamp.identity)
    return tuple(names)


def _excluded(spec: DatasetSpec, found: Discovery) -> Discovery:
    if spec.exclude_file is None:
        return found
    excluded = read_exclusions(spec.exclude_file)
    kept = [r for r in found.records if not any(name in excluded for name in exclusion_names(spec, r))]
    if len(kept) != len(found.records):
        logger.info("dataset %r: %d images left out by exclude_file %s", spec.id, len(found.records) - len(kept),
                    spec.exclude_file)
    return Discovery(records=kept, skipped=found.skipped)


def discover_records(spec: DatasetSpec, index: FileIndex | None = None) -> Discovery:
    """Every image of `spec` that has a caption, sorted by path; skipped images and why.

    Raises DataError when the directory (or the bucket's prefix) holds no image file at all (a wrong
    `instance_data_dir`), or when the bucket cannot be used (named, with the fix). A dataset whose
    every image is skipped is returned empty, with a warning: the run goes on while another dataset
    has usable images (`prepare_data` stops when none has). Caption files found unchanged in `index`
    are not read again. Images named in the entry's `exclude_file` are left out (logged as a count).
    """
    from expertune.data.catalog import discover_remote, from_manifest  # they build on this module

    if spec.manifest is not None:
        found = from_manifest(spec, index)
    elif spec.remote is not None:
        found = discover_remote(spec, index)
    else:
        found = _discover_local(spec, index)
    return _excluded(spec, found)


FOLDER_CAPTIONS_KIND = "captions"  # FileIndex.folders kind: {"c": {image name: caption lines, or a reason}}


def _discover_local(spec: DatasetSpec, index: FileIndex | None = None) -> Discovery:
    """A local entry: a walk of its directory (each image's stamp comes from the walk's listing).

    With the `textfile` strategy a folder whose caption files are all unchanged takes every caption from one
    whole-folder entry; otherwise each caption file comes from its own entry, or is read (and both are kept)."""
    records: list[ImageRecord] = []
    skipped: list[SkippedImage] = []
    unnamed: list[str] = []
    listed = _walk_images(spec.instance_data_dir, unnamed)
    skipped.extend(SkippedImage(path=Path(shown), reason="its name is not UTF-8; rename it to use it")
                   for shown in unnamed)
    textfile = spec.caption_strategy == "textfile"
    folders = FolderEntries(index, FOLDER_CAPTIONS_KIND, "c")
    for found in listed:
        path = Path(found.path)
        reason: str | None = None
        if textfile:
            folder = found.folder.captions
            lines = folders.known(folder).get(found.name) if found.caption_stamp is not None else None
            if isinstance(lines, list) and lines:
                captions = tuple(str(line) for line in lines)
            elif isinstance(lines, str):
                captions, reason = (), lines
            else:
                captions, reason = _captions_from_textfile(found.path, index, found.caption_stamp)
                if found.caption_stamp is not None:
                    folders.learn(folder, found.name, list(captions) if reason is None else reason)
        else:
            captions, reason = _other_captions(spec, path)
        if reason is not None:
            logger.warning("dataset %r: skipping %s: %s", spec.id, path, reason)
            skipped.append(SkippedImage(path=path, reason=reason))
        else:
            records.append(ImageRecord(path=path, captions=captions, dataset_id=spec.id, stamp=found.stamp,
                                       listing=found.folder.images))
    folders.remember()
    return _finish(spec, records, skipped, len(listed) + len(unnamed), str(spec.instance_data_dir))
