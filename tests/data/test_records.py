from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from expertune.data.dataloader import DatasetSpec, DataloaderConfig, load_dataloader_config
from expertune.data.records import discover_records
from expertune.errors import ConfigError, DataError


def _png(path: Path, size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path: Path, entries: Any) -> Path:
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def _load(path: Path, tmp_path: Path) -> DataloaderConfig:
    return load_dataloader_config(path, default_resolution=64, default_cache_dir=tmp_path / "default-cache")


@pytest.fixture
def three_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with one dataset per caption strategy and a SimpleTuner-style JSON."""
    monkeypatch.chdir(tmp_path)
    textfile = tmp_path / "photos"
    _png(textfile / "a.png")
    (textfile / "a.txt").write_text("a red cube\n\n   on a table  \n", encoding="utf-8")
    _png(textfile / "nested" / "c.JPG")  # a PNG under a .JPG name is fine: the walk goes by extension
    (textfile / "nested" / "c.txt").write_text("\ufeffa blue ball\n", encoding="utf-8")  # BOM stripped
    _png(textfile / "b.png")  # no caption file: skipped
    _png(textfile / "empty.png")
    (textfile / "empty.txt").write_text(" \n\n", encoding="utf-8")
    _png(textfile / "latin1.png")
    (textfile / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (textfile / "._a.png").write_bytes(b"AppleDouble junk")  # hidden: never an image
    (textfile / "notes.md").write_text("not an image")

    filename = tmp_path / "by-name"
    _png(filename / "red_cube--on  a-table.webp")
    _png(filename / "z" / "Blue_Ball.BMP")

    prompt = tmp_path / "subject"
    _png(prompt / "one.jpeg")
    _png(prompt / "two.png")

    return _write(
        tmp_path / "multidatabackend.json",
        [
            {
                "id": "photos",
                "type": "local",
                "instance_data_dir": "photos",
                "caption_strategy": "textfile",
                "resolution": 32,
                "resolution_type": "pixel",
                "crop": True,
                "crop_style": "random",
                "crop_aspect": "square",
                "cache_dir_vae": "cache/vae/photos",
                "repeats": 2,
                "probability": 0.5,
                "skip_file_discovery": "",
            },
            {"id": "by-name", "type": "local", "instance_data_dir": str(filename), "caption_strategy": "filename"},
            {
                "id": "subject",
                "instance_data_dir": "subject",
                "caption_strategy": "instanceprompt",
                "instance_prompt": "a photo of sks dog",
                "disable_validation": True,
                "crop_style": "corner",
            },
            {"id": "old", "instance_data_dir": "does-not-exist", "disabled": True},
            {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "default": True, "cache_dir": "cache/text"},
        ],
    )


def test_happy_path_all_caption_strategies(three_datasets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="expertune.data"):
        config = _load(three_datasets, tmp_path)

    assert config.source == three_datasets
    assert [spec.id for spec in config.datasets] == ["photos", "by-name", "subject"]  # disabled entry left out
    photos, by_name, subject = config.datasets
    assert photos == DatasetSpec(
        id="photos",
        instance_data_dir=tmp_path / "photos",  # relative to the current directory
        caption_strategy="textfile",
        instance_prompt=None,
        resolution=32,
        crop_style="random",
        cache_dir_vae=tmp_path / "cache/vae/photos",
        repeats=2,
        disable_validation=False,
        probability=0.5,
    )
    # Defaults: resolution, crop style, cache dir, repeats.
    assert (by_name.resolution, by_name.crop_style, by_name.repeats) == (64, "center", 0)
    assert by_name.cache_dir_vae == tmp_path / "default-cache" / "latents"
    assert subject.crop_style == "corner" and subject.disable_validation is True
    assert config.text_embeds.id == "text-embeds"
    assert config.text_embeds.cache_dir == tmp_path / "cache/text"
    # The unknown SimpleTuner field is named with its entry, not silently dropped.
    assert any("'skip_file_discovery'" in r.getMessage() and "'photos'" in r.getMessage() for r in caplog.records)
    # Bucket defaults: pixel squares, 64-pixel alignment, every image kept, weight 1.
    assert (by_name.resolution_type, by_name.crop, by_name.crop_aspect, by_name.alignment) == ("pixel", True, "square", 64)
    assert (by_name.minimum_image_size, by_name.maximum_image_size, by_name.probability) == (None, None, 1.0)

    records, skipped = discover_records(photos)
    assert [(r.path.relative_to(tmp_path).as_posix(), r.captions) for r in records] == [
        ("photos/a.png", ("a red cube", "on a table")),
        ("photos/nested/c.JPG", ("a blue ball",)),
    ]
    assert all(r.dataset_id == "photos" for r in records)
    reasons = {path.name: reason for path, reason in skipped}  # (path, reason) pairs
    assert set(reasons) == {"b.png", "empty.png", "latin1.png"}
    assert "missing" in reasons["b.png"] and "empty" in reasons["empty.png"] and "UTF-8" in reasons["latin1.png"]

    records, skipped = discover_records(by_name)
    assert [r.captions for r in records] == [("red cube on a table",), ("Blue Ball",)]
    assert skipped == []

    records, _ = discover_records(subject)
    assert [r.path.name for r in records] == ["one.jpeg", "two.png"]
    assert {r.captions for r in records} == {("a photo of sks dog",)}


def test_discovery_is_sorted_and_deterministic(three_datasets: Path, tmp_path: Path) -> None:
    spec = _load(three_datasets, tmp_path).datasets[1]
    first, again = discover_records(spec), discover_records(spec)
    assert first == again
    assert [r.path for r in first.records] == sorted(r.path for r in first.records)


def test_skipped_images_are_logged_with_their_file(three_datasets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = _load(three_datasets, tmp_path).datasets[0]
    with caplog.at_level(logging.WARNING, logger="expertune.data"):
        discover_records(spec)
    assert any(str(tmp_path / "photos" / "b.txt") in r.getMessage() for r in caplog.records)


def test_defaults_without_text_embeds_entry(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "x.png")
    path = _write(tmp_path / "d.json", [{"id": "only", "type": "local", "instance_data_dir": str(tmp_path / "imgs")}])
    config = _load(path, tmp_path)
    assert config.text_embeds.cache_dir == tmp_path / "default-cache" / "text_embeds"
    assert config.datasets[0].caption_strategy == "filename"


def test_dataset_without_usable_images_names_the_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _png(tmp_path / "imgs" / "x.png")  # textfile strategy but no caption file
    spec = DatasetSpec("d", tmp_path / "imgs", "textfile", None, 32, "center", tmp_path / "c", 0, False)
    with caplog.at_level(logging.WARNING, logger="expertune.data"):
        records, skipped = discover_records(spec)  # the run may go on with other datasets
    assert records == [] and [path.name for path, _ in skipped] == ["x.png"]
    assert any("all 1 images" in r.getMessage() and str(tmp_path / "imgs") in r.getMessage() for r in caplog.records)
    empty = DatasetSpec("e", tmp_path, "filename", None, 32, "center", tmp_path / "c", 0, False)
    (tmp_path / "imgs" / "x.png").unlink()
    with pytest.raises(DataError, match="no image files") as info:
        discover_records(empty)
    assert str(tmp_path) in str(info.value)


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found") as info:
        _load(missing, tmp_path)
    assert str(missing) in str(info.value)

    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": "a",\n   "type": local}\n]\n')
    with pytest.raises(ConfigError, match=r"line 3, column 12") as info:
        _load(broken, tmp_path)
    assert str(broken) in str(info.value)

    not_list = _write(tmp_path / "obj.json", {"id": "a"})
    with pytest.raises(ConfigError, match=r"JSON list.*\[ \.\.\. \]") as info:
        _load(not_list, tmp_path)
    assert str(not_list) in str(info.value)

    only_embeds = _write(tmp_path / "te.json", [{"id": "te", "dataset_type": "text_embeds", "cache_dir": "x"}])
    with pytest.raises(ConfigError, match="no enabled image dataset") as info:
        _load(only_embeds, tmp_path)
    assert str(only_embeds) in str(info.value)


_BAD_ENTRIES: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, second entry, field named, words of the fix or problem)
    ("missing id", {"instance_data_dir": "{dir}"}, "id", "Add"),
    ("missing dir", {"id": "bad"}, "instance_data_dir", "Add"),
    ("dir does not exist", {"id": "bad", "instance_data_dir": "{dir}/nowhere"}, "instance_data_dir", "does not exist"),
    ("bad strategy", {"id": "bad", "instance_data_dir": "{dir}", "caption_strategy": "parquet"}, "caption_strategy", "textfile"),
    ("prompt missing", {"id": "bad", "instance_data_dir": "{dir}", "caption_strategy": "instanceprompt"}, "instance_prompt", "Add"),
    ("duplicate id", {"id": "good", "instance_data_dir": "{dir}"}, "id", "unique"),
    ("resolution type", {"id": "bad", "instance_data_dir": "{dir}", "resolution_type": "megapixel"}, "resolution_type", "pixel_area"),
    ("area in pixels", {"id": "bad", "instance_data_dir": "{dir}", "resolution_type": "area", "resolution": 1024}, "resolution", "megapixels"),
    ("area default", {"id": "bad", "instance_data_dir": "{dir}", "resolution_type": "area"}, "resolution", "the run's --resolution"),
    ("pixel fraction", {"id": "bad", "instance_data_dir": "{dir}", "resolution_type": "pixel_area", "resolution": 1.5}, "resolution", "whole number"),
    ("crop", {"id": "bad", "instance_data_dir": "{dir}", "crop": "yes"}, "crop", "true or false"),
    ("crop aspect", {"id": "bad", "instance_data_dir": "{dir}", "crop_aspect": "closest"}, "crop_aspect", "preserve"),
    ("alignment", {"id": "bad", "instance_data_dir": "{dir}", "aspect_bucket_alignment": 48}, "aspect_bucket_alignment", "64"),
    ("minimum", {"id": "bad", "instance_data_dir": "{dir}", "minimum_image_size": -1}, "minimum_image_size", "number >= 0"),
    ("maximum below minimum", {"id": "bad", "instance_data_dir": "{dir}", "minimum_image_size": 512, "maximum_image_size": 256}, "maximum_image_size", "below"),
    ("area minimum in pixels", {"id": "bad", "instance_data_dir": "{dir}", "resolution_type": "area", "resolution": 1.0, "minimum_image_size": 512}, "minimum_image_size", "megapixels"),
    ("probability", {"id": "bad", "instance_data_dir": "{dir}", "probability": 0}, "probability", "number > 0"),
    ("remote", {"id": "bad", "type": "huggingface", "instance_data_dir": "{dir}"}, "type", "aws"),
    ("aws text embeds", {"id": "bad", "type": "aws", "dataset_type": "text_embeds", "aws_bucket_name": "b"}, "type", "cache_dir"),
    ("crop style", {"id": "bad", "instance_data_dir": "{dir}", "crop_style": "face"}, "crop_style", "center"),
    ("resolution", {"id": "bad", "instance_data_dir": "{dir}", "resolution": 30}, "resolution", "multiple of 8"),
    ("repeats", {"id": "bad", "instance_data_dir": "{dir}", "repeats": -1}, "repeats", "integer"),
    ("dataset type", {"id": "bad", "instance_data_dir": "{dir}", "dataset_type": "video"}, "dataset_type", "text_embeds"),
]


@pytest.mark.parametrize("case, entry, field, words", _BAD_ENTRIES, ids=[case[0] for case in _BAD_ENTRIES])
def test_entry_errors_name_file_entry_and_field(
    tmp_path: Path, case: str, entry: dict[str, Any], field: str, words: str
) -> None:
    _png(tmp_path / "imgs" / "x.png")
    entry = {k: (v.format(dir=tmp_path / "imgs") if isinstance(v, str) else v) for k, v in entry.items()}
    path = _write(tmp_path / "loader.json", [{"id": "good", "instance_data_dir": str(tmp_path / "imgs")}, entry])
    with pytest.raises(ConfigError) as info:
        _load(path, tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "entry 1" in message
    assert (f"(id {entry['id']!r})" if "id" in entry else "(no id)") in message
    assert f"field {field!r}" in message
    assert words in message


def test_text_embeds_defaults_must_be_unambiguous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _png(tmp_path / "imgs" / "x.png")
    image = {"id": "img", "instance_data_dir": str(tmp_path / "imgs")}
    two_defaults = [image] + [
        {"id": f"te{i}", "dataset_type": "text_embeds", "default": True, "cache_dir": f"c{i}"} for i in range(2)
    ]
    with pytest.raises(ConfigError, match=r"entry 2 \(id 'te1'\), field 'default'"):
        _load(_write(tmp_path / "a.json", two_defaults), tmp_path)
    no_default = [image] + [{"id": f"te{i}", "dataset_type": "text_embeds", "cache_dir": f"c{i}"} for i in range(2)]
    with pytest.raises(ConfigError, match="none is marked default"):
        _load(_write(tmp_path / "b.json", no_default), tmp_path)
    one_default = [image, no_default[1], {**no_default[2], "default": True, "cache_dir": str(tmp_path / "chosen")}]
    with caplog.at_level(logging.WARNING, logger="expertune.data"):
        config = _load(_write(tmp_path / "c.json", one_default), tmp_path)
    assert config.text_embeds.cache_dir == tmp_path / "chosen"
    assert any("'te0'" in r.getMessage() for r in caplog.records)


def test_a_name_that_is_not_utf8_is_skipped_with_a_named_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import os

    from expertune.data.file_index import FileIndex

    images = tmp_path / "images"
    _png(images / "good.png")
    bad = os.path.join(os.fsencode(images), b"caf\xe9-\xff.png")
    with open(bad, "wb") as stream:
        stream.write((images / "good.png").read_bytes())
    os.mkdir(os.path.join(os.fsencode(images), b"dir\xff"))
    _png(Path(os.fsdecode(os.path.join(os.fsencode(images), b"dir\xff", b"inner.png"))))
    spec = DatasetSpec("set", images, "filename", None, 64, "center", tmp_path / "cache", 0, False)
    index = FileIndex(tmp_path / "index.jsonl")
    with caplog.at_level(logging.WARNING):
        found = discover_records(spec, index)
    index.flush()
    assert [record.path.name for record in found.records] == ["good.png"]
    assert sorted(str(skip.path) for skip in found.skipped) == [f"{images}/caf\\xe9-\\xff.png", f"{images}/dir\\xff"]
    assert all(skip.reason == "its name is not UTF-8; rename it to use it" for skip in found.skipped)
    assert f"skipping {images}/caf\\xe9-\\xff.png: its name is not UTF-8" in caplog.text
    json.dumps([str(skip.path) for skip in found.skipped]).encode("utf-8")  # what run.json lists
