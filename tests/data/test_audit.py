"""`expertune audit`: JPEG quality from quantisation tables, the difference hash, and the report per dataset."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expertune.cli import main
from expertune.data.audit import (
    IJG_LUMINANCE,
    AuditSettings,
    audit_dataset,
    dhash,
    hamming,
    ijg_table,
    jpeg_quality,
    near_duplicate_groups,
)
from expertune.data.dataloader import load_dataloader_config
from expertune.data.records import discover_records


def _noise(size: tuple[int, int], seed: int) -> Image.Image:  # size is (w, h)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)  # smooth content: resizes stay similar
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_ijg_scaling_matches_libjpeg() -> None:
    assert ijg_table(IJG_LUMINANCE, 50) == list(IJG_LUMINANCE)  # quality 50 is the table itself
    assert ijg_table(IJG_LUMINANCE, 100) == [1] * 64
    assert ijg_table(IJG_LUMINANCE, 10)[0] == (16 * 500 + 50) // 100  # scale 5000/10 = 500 -> 80
    assert ijg_table(IJG_LUMINANCE, 1)[0] == 255  # clamped to baseline


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 90, 97])
def test_jpeg_quality_is_read_back_from_the_tables_pil_writes(quality: int) -> None:
    buffer = io.BytesIO()
    _noise((64, 64), 0).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as image:
        assert jpeg_quality(image.quantization) == quality
    assert jpeg_quality({}) is None


def test_dhash_by_its_definition() -> None:
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(8, 9), dtype=np.uint8)
    expected = 0
    for row in range(8):
        for column in range(8):
            if grey[row, column + 1] > grey[row, column]:
                expected |= 1 << (row * 8 + column)
    image = Image.fromarray(grey, "L")
    assert dhash(image) == expected  # already 9 x 8: the box filter leaves it as it is
    assert dhash(image.resize((90, 80), Image.Resampling.NEAREST)) == expected  # 10x10 blocks average back
    assert dhash(image.convert("RGB")) == expected
    assert hamming(0b1011, 0b0001) == 2


def test_near_duplicate_groups_keep_the_largest() -> None:
    a = 0x0123_4567_89AB_CDEF
    items = [("small_copy", a ^ 0b101, 100), ("original", a, 400), ("other", ~a & (2**64 - 1), 400),
             ("far_copy", a ^ 0b1111_0000, 50), ("unhashed", None, 10)]
    assert near_duplicate_groups(items, 3) == [("original", ["small_copy"])]  # far_copy: 4 and 6 bits away
    # Groups are transitive: a chain of near copies is one group, the largest kept.
    chain = [("a", a, 10), ("b", a ^ 0b111, 20), ("c", a ^ 0b111_000, 30)]
    assert near_duplicate_groups(chain, 3) == [("c", ["b", "a"])]
    with pytest.raises(ValueError):
        near_duplicate_groups(items, 4)


def _messy(root: Path) -> Path:
    folder = root / "set"
    folder.mkdir(parents=True)
    captions = {}
    base = _noise((128, 128), 1)
    base.save(folder / "good.png")
    captions["good"] = "a good picture"
    base.resize((120, 120), Image.Resampling.LANCZOS).save(folder / "good_resized.png")
    captions["good_resized"] = "a resized copy"
    _noise((32, 32), 2).save(folder / "small.png")
    captions["small"] = "a small picture"
    _noise((128, 128), 3).save(folder / "blocky.jpg", quality=30)
    captions["blocky"] = "a compressed picture"
    _noise((128, 128), 4).save(folder / "fine.jpg", quality=95)
    captions["fine"] = "a fine jpeg"
    _noise((400, 100), 5).save(folder / "banner.png")
    captions["banner"] = "a banner"
    _noise((128, 128), 6).save(folder / "broken.png")
    data = (folder / "broken.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])
    captions["broken"] = "a broken file"
    _noise((128, 128), 7).save(folder / "twin_a.png")
    _noise((128, 128), 8).save(folder / "twin_b.png")
    captions["twin_a"] = captions["twin_b"] = "the same caption twice"
    _noise((128, 128), 9).save(folder / "uncaptioned.png")
    _noise((128, 128), 10).save(folder / "blank.png")
    captions["blank"] = "   "
    for stem, text in captions.items():
        (folder / f"{stem}.txt").write_text(text + "\n")
    loader = root / "loader.json"
    loader.write_text(json.dumps([{"id": "set", "instance_data_dir": str(folder), "caption_strategy": "textfile",
                                   "resolution": 64}]))
    return loader


def _flags(report) -> dict[str, set[str]]:
    return {Path(name).name: {kind for kind, _ in flags} for name, flags in report.flagged.items()}


def test_audit_flags_what_a_careful_user_would_remove(tmp_path: Path) -> None:
    loader = _messy(tmp_path)
    spec = load_dataloader_config(loader, default_resolution=64, default_cache_dir=tmp_path / "cache").datasets[0]
    report = audit_dataset(spec, AuditSettings())
    assert _flags(report) == {
        "good_resized.png": {"duplicate"}, "small.png": {"small"}, "blocky.jpg": {"compressed"},
        "banner.png": {"aspect"}, "broken.png": {"unreadable"}, "twin_a.png": {"dup_caption"},
        "twin_b.png": {"dup_caption"}, "uncaptioned.png": {"no_caption"}, "blank.png": {"no_caption"},
    }
    details = {Path(name).name: flags for name, flags in report.flagged.items()}
    assert details["good_resized.png"] == [("duplicate", f"near-duplicate of {spec.instance_data_dir / 'good.png'}")]
    assert "quality about 30" in details["blocky.jpg"][0][1]
    assert report.images == 11
    assert [Path(n).name for n in report.excluded()] == sorted(
        ["good_resized.png", "small.png", "blocky.jpg", "banner.png", "broken.png", "uncaptioned.png", "blank.png"])


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_audit_verb_table_json_and_an_exclude_file_the_dataloader_honours(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    loader = _messy(tmp_path)
    folder = tmp_path / "set"
    before = _digests(folder)
    assert main(["audit", str(loader)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["dataset", "images", "unreadable"]
    assert table.splitlines()[2].split()[:9] == ["set", "11", "1", "1", "1", "1", "1", "2", "2"]
    assert f"set: {folder / 'blocky.jpg'}: compressed: JPEG quality about 30" in table

    exclude = tmp_path / "exclude.txt"
    assert main(["audit", str(loader), "--json", "--write-exclude", str(exclude)]) == 0
    report = json.loads(capsys.readouterr().out)
    (dataset,) = report["datasets"]
    assert dataset["counts"]["duplicate"] == 1 and dataset["to_exclude"] == 7 and dataset["images_per_second"] > 0
    listed = [line for line in exclude.read_text().splitlines() if not line.startswith("#")]
    assert len(listed) == 7 and str(folder / "blocky.jpg") in listed
    assert _digests(folder) == before  # nothing modified, nothing deleted

    entries = json.loads(loader.read_text())
    entries[0]["exclude_file"] = str(exclude)
    loader.write_text(json.dumps(entries))
    spec = load_dataloader_config(loader, default_resolution=64, default_cache_dir=tmp_path / "cache").datasets[0]
    records, _ = discover_records(spec)
    assert sorted(r.path.name for r in records) == ["fine.jpg", "good.png", "twin_a.png", "twin_b.png"]


def test_audit_of_a_bucket_names_objects(s3, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bucket = s3.bucket()
    folder = tmp_path / "images"
    folder.mkdir()
    _noise((128, 128), 1).save(folder / "big.png")
    _noise((32, 32), 2).save(folder / "small.png")
    loader = tmp_path / "loader.json"
    loader.write_text(json.dumps([{"id": "remote", "type": "aws", "aws_bucket_name": bucket,
                                   "aws_endpoint_url": s3.endpoint, "caption_strategy": "filename"}]))
    s3.upload(bucket, folder)
    exclude = tmp_path / "exclude.txt"
    assert main(["audit", str(loader), "--resolution", "64", "--cache_dir", str(tmp_path / "cache"),
                 "--write-exclude", str(exclude)]) == 0
    assert f"remote: s3://{bucket}/small.png: small: 32x32" in capsys.readouterr().out
    assert exclude.read_text().splitlines()[1:] == [f"s3://{bucket}/small.png"]
    entries = json.loads(loader.read_text())
    entries[0]["exclude_file"] = str(exclude)
    loader.write_text(json.dumps(entries))
    spec = load_dataloader_config(loader, default_resolution=64, default_cache_dir=tmp_path / "cache").datasets[0]
    assert [r.remote_key for r in discover_records(spec).records] == ["big.png"]
