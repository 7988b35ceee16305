"""Manifests (JSONL, CSV, Parquet) instead of a walk or a listing, and exclude files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from expertune.data.dataloader import load_dataloader_config
from expertune.data.manifest import read_manifest
from expertune.data.records import discover_records
from expertune.errors import ConfigError, DataError


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + index, 30), (index * 40, 0, 0)).save(folder / name)
    return folder


def _spec(tmp_path: Path, entry: dict):
    loader = tmp_path / "loader.json"
    loader.write_text(json.dumps([{"id": "set", "resolution": 64, **entry}]))
    return load_dataloader_config(loader, default_resolution=64, default_cache_dir=tmp_path / "cache").datasets[0]


ROWS = [
    {"path": "a.png", "caption": "the first image", "width": 40, "height": 30},
    {"path": "sub/b.png", "caption": ["two captions", "of the second"]},
    {"path": "c.png", "caption": ""},  # no caption: the entry's strategy (filename here)
]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["path", "caption", "width", "height"])
            writer.writeheader()
            for row in rows:
                caption = row.get("caption")
                writer.writerow({**row, "caption": caption[0] if isinstance(caption, list) else caption})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": [r["path"] for r in rows],
                          "caption": [r["caption"] if isinstance(r["caption"], str) else r["caption"][0] for r in rows],
                          "width": [r.get("width") for r in rows], "height": [r.get("height") for r in rows]})
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_manifest_replaces_the_walk(tmp_path: Path, suffix: str) -> None:
    folder = _images(tmp_path / "images", ["a.png", "sub/b.png", "c.png", "not_in_manifest.png"])
    manifest = _write(tmp_path / f"manifest{suffix}", ROWS)
    spec = _spec(tmp_path, {"instance_data_dir": str(folder), "manifest": str(manifest),
                            "caption_strategy": "filename"})
    records, skipped = discover_records(spec)
    assert skipped == []
    assert [r.path.relative_to(folder).as_posix() for r in records] == ["a.png", "c.png", "sub/b.png"]
    by_name = {r.path.name: r for r in records}
    assert by_name["a.png"].captions == ("the first image",) and by_name["a.png"].declared_size == (30, 40)
    assert by_name["c.png"].captions == ("c",) and by_name["c.png"].declared_size is None
    expected_b = ("two captions", "of the second") if suffix == ".jsonl" else ("two captions",)
    assert by_name["b.png"].captions == expected_b


def test_manifest_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.png"}\n{"caption": "no path"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 has no image path"):
        read_manifest(bad)
    bad.write_text('{"path": "../outside.png"}\n')
    with pytest.raises(DataError, match=r"line 1: path '../outside.png' leaves the dataset folder"):
        read_manifest(bad)
    bad.write_text('{"path": "a.png", "width": "wide"}\n')
    with pytest.raises(DataError, match=r"line 1: width must be a whole number"):
        read_manifest(bad)
    with pytest.raises(ConfigError, match=r"field 'manifest'.*is not one of"):
        _spec(tmp_path, {"instance_data_dir": str(tmp_path), "manifest": str(tmp_path / "list.txt")})
    with pytest.raises(ConfigError, match=r"field 'manifest'.*does not exist"):
        _spec(tmp_path, {"instance_data_dir": str(tmp_path), "manifest": str(tmp_path / "gone.jsonl")})


def test_a_missing_image_of_a_manifest_is_skipped_when_read(tmp_path: Path) -> None:
    folder = _images(tmp_path / "images", ["a.png"])
    manifest = _write(tmp_path / "m.jsonl", [{"path": "a.png", "caption": "x"}, {"path": "gone.png", "caption": "y"}])
    spec = _spec(tmp_path, {"manifest": str(manifest)})  # instance_data_dir: the manifest's folder
    assert spec.instance_data_dir == tmp_path
    spec = _spec(tmp_path, {"instance_data_dir": str(folder), "manifest": str(manifest)})
    records, _ = discover_records(spec)  # no stat at discovery: the data stage reports it, like any bad file
    assert [r.path.name for r in records] == ["a.png", "gone.png"]


def test_exclude_file_leaves_images_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _images(tmp_path / "images", ["a.png", "b.png", "sub/c.png"])
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(f"# written by expertune audit\n{folder / 'a.png'}\nsub/c.png\n")
    spec = _spec(tmp_path, {"instance_data_dir": str(folder), "exclude_file": str(exclude)})
    with caplog.at_level("INFO", logger="expertune.data"):
        records, skipped = discover_records(spec)
    assert [r.path.name for r in records] == ["b.png"] and skipped == []
    assert "2 images left out by exclude_file" in caplog.text


def test_a_bucket_manifest_lists_nothing(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    folder = _images(tmp_path / "images", ["a.png", "b.png"])
    (folder / "b.txt").write_text("caption of b from its text object\n")
    s3.upload(bucket, folder, prefix="set/")
    manifest = _write(tmp_path / "m.jsonl", [{"path": "a.png", "caption": "caption of a"}, {"path": "b.png"},
                                             {"path": "deleted.png", "caption": "never uploaded"}])
    spec = _spec(tmp_path, {"type": "aws", "aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url,
                            "aws_data_prefix": "set", "manifest": str(manifest), "caption_strategy": "textfile"})
    s3.flaky.requests.clear()
    records, skipped = discover_records(spec)
    assert [(r.remote_key, r.captions) for r in records] == [
        ("set/a.png", ("caption of a",)), ("set/b.png", ("caption of b from its text object",))]
    assert records[0].stamp.size == (folder / "a.png").stat().st_size
    assert [(p.name, reason) for p, reason in skipped] == [
        ("deleted.png", f"object s3://{bucket}/set/deleted.png does not exist (manifest m.jsonl line 3)")]
    # One single-key check of the bucket, HEADs and the caption object: no listing of the keys, no image bytes.
    gets = [path for method, path in s3.flaky.requests if method == "GET"]
    assert gets.count(f"/{bucket}") == 1 and f"/{bucket}/set/b.txt" in gets
    assert not [path for path in gets if path.endswith(".png")]
