"""`"type": "aws"` datasets against a real S3-compatible server (moto's, in its own process, on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3_server_helpers import ACCESS_KEY, free_port
from expertune.data import remote
from expertune.data.dataloader import S3Location, load_dataloader_config
from expertune.data.file_index import FileIndex
from expertune.data.records import discover_records
from expertune.errors import ConfigError, DataError


def _images(folder: Path, count: int = 3, *, size: int = 96) -> Path:
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image

    for index, (shape, colour, background) in enumerate(SHAPES[:count]):
        save_captioned_image(draw_shape(shape, colour, background, size=size), folder / f"shape_{index}.png",
                             f"a {colour} {shape} on a {background} background")
    return folder


def _loader(tmp_path: Path, entry: dict, *, cache: Path | None = None, name: str = "dataloader.json") -> Path:
    path = tmp_path / name
    cache = cache or tmp_path / "cache"
    entries = [
        {"id": "bucket-images", "type": "aws", "caption_strategy": "textfile", "resolution": 64,
         "cache_dir_vae": str(cache / "latents"), **entry},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": str(cache / "text_embeds")},
    ]
    path.write_text(json.dumps(entries, indent=2))
    return path


def _spec(loader: Path, cache: Path):
    return load_dataloader_config(loader, default_resolution=64, default_cache_dir=cache).datasets[0]


# ---- the entry ---------------------------------------------------------------------------------------


def test_aws_entry_fields_in_simpletuner_form(tmp_path: Path) -> None:
    loader = _loader(tmp_path, {"aws_bucket_name": "photos", "aws_region_name": "eu-west-1",
                                "aws_endpoint_url": "https://s3.example.com", "aws_access_key_id": "AK",
                                "aws_secret_access_key": "SK", "aws_data_prefix": "sets/a"})
    spec = _spec(loader, tmp_path / "cache")
    assert spec.remote == S3Location(bucket="photos", prefix="sets/a/", region="eu-west-1",
                                     endpoint_url="https://s3.example.com", access_key_id="AK",
                                     secret_access_key="SK")
    assert "SK" not in repr(spec)  # secrets stay out of logs
    assert spec.instance_data_dir == tmp_path / "cache" / "objects" / "photos" / "sets" / "a"
    # Only the bucket is required: the rest falls back to boto's environment and config files.
    bare = _spec(_loader(tmp_path, {"aws_bucket_name": "photos"}, name="bare.json"), tmp_path / "cache")
    assert bare.remote == S3Location(bucket="photos")


@pytest.mark.parametrize("entry, field, words", [
    ({}, "aws_bucket_name", "is missing"),
    ({"aws_bucket_name": "s3://photos/x"}, "aws_bucket_name", "not a bucket name"),
    ({"aws_bucket_name": "p", "aws_endpoint_url": "localhost:9000"}, "aws_endpoint_url", "http(s) URL"),
    ({"aws_bucket_name": "p", "aws_access_key_id": "AK"}, "aws_secret_access_key", "its pair"),
    ({"aws_bucket_name": "p", "instance_data_dir": "/data"}, "instance_data_dir", "not used"),
    ({"aws_bucket_name": ".."}, "aws_bucket_name", "not a bucket name"),
    ({"aws_bucket_name": "p", "aws_data_prefix": "a/../../b"}, "aws_data_prefix", "'..' folder"),
    ({"aws_bucket_name": "p", "aws_data_prefix": "a//b/"}, "aws_data_prefix", "empty, '.' or '..'"),
    ({"aws_bucket_name": "p", "aws_max_object_bytes": 0}, "aws_max_object_bytes", "integer >= 1"),
])
def test_aws_entry_errors_name_the_field(tmp_path: Path, entry: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as error:
        _spec(_loader(tmp_path, entry), tmp_path / "cache")
    assert f"'bucket-images'" in str(error.value) and repr(field) in str(error.value) and words in str(error.value)


# ---- listing, credentials, errors ---------------------------------------------------------------------


def test_discovery_lists_the_prefix_and_pairs_caption_objects(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 3), prefix="sets/shapes/")
    s3.client.put_object(Bucket=bucket, Key="sets/shapes/uncaptioned.png",
                         Body=(tmp_path / "images" / "shape_0.png").read_bytes())
    s3.client.put_object(Bucket=bucket, Key="other/outside.png", Body=b"not listed")
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                "aws_data_prefix": "sets/shapes"})
    spec = _spec(loader, tmp_path / "cache")
    index = FileIndex(tmp_path / "index.jsonl")
    records, skipped = discover_records(spec, index)
    assert [r.remote_key for r in records] == [f"sets/shapes/shape_{i}.png" for i in range(3)]
    assert records[0].captions == ("a red circle on a white background",) or records[0].captions
    assert records[0].stamp.identity == f"s3://{bucket}/sets/shapes/shape_0.png" and records[0].stamp.version
    assert records[0].path == spec.instance_data_dir / "shape_0.png"
    assert [(p.name, r) for p, r in skipped] == [
        ("uncaptioned.png", f"caption file s3://{bucket}/sets/shapes/uncaptioned.txt is missing")]
    # Caption texts are kept in the index: a second discovery reads no caption object.
    index.flush()
    again = FileIndex(tmp_path / "index.jsonl")
    assert discover_records(spec, again).records == records
    assert again.hits == 3 and again.misses == 0


def _listing_threads() -> list[str]:
    import threading

    return [thread.name for thread in threading.enumerate() if thread.name.startswith("expertune-list")]


def test_listing_goes_folder_by_folder_concurrently_and_yields_every_key_once(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    keys = ["sets/top.png", "sets/f1/a.png", "sets/f1/b.png", "sets/f1/c.png", "sets/f1/deep/d.png",
            "sets/f2/e.png", "sets/.hidden/h.png", *(f"sets/f3/{n:02d}.png" for n in range(7))]
    for key in [*keys, "sets/empty/", "other/outside.png"]:
        s3.client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    monkeypatch.setattr(remote, "LISTING_WORKERS", 2)  # 4 pages wait at most: the listers block, then go on
    monkeypatch.setattr(remote, "LISTING_PAGE_SIZE", 2)
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "aws_data_prefix": "sets"}), tmp_path / "cache")
    listed = list(remote.S3Dataset(spec).list_objects())
    assert sorted(obj.key for obj in listed) == sorted(keys)  # each once; no placeholder, nothing outside
    assert all(obj.size == len(obj.key) and obj.etag for obj in listed)
    assert listed[0].key == "sets/top.png"  # the prefix's own objects first, then folder by folder
    # A reader that stops early leaves no lister behind.
    objects = remote.S3Dataset(spec).list_objects()
    next(objects), next(objects)
    objects.close()
    assert _listing_threads() == []


def test_a_folder_listing_that_fails_stops_the_run_with_the_fix(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    bucket = s3.bucket()
    for key in ["data/a/1.png", "data/b/2.png", "data/c/3.png"]:
        s3.client.put_object(Bucket=bucket, Key=key, Body=b"x")
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "aws_data_prefix": "data"}), tmp_path / "cache")
    pages = remote.S3Dataset._pages

    def refused_for_b(self, prefix, delimiter=None):
        if prefix == "data/b/":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "ListObjectsV2")
        yield from pages(self, prefix, delimiter)

    monkeypatch.setattr(remote.S3Dataset, "_pages", refused_for_b)
    with pytest.raises(DataError) as error:
        list(remote.S3Dataset(spec).list_objects())
    assert "'bucket-images'" in str(error.value) and "access denied" in str(error.value)
    assert error.value.exit_code == 2 and _listing_threads() == []


def test_credentials_from_the_entry_else_from_the_environment(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 1))
    own = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url,
                             "aws_access_key_id": "AKIDFROMENTRY", "aws_secret_access_key": "entry-secret",
                             "aws_region_name": "eu-central-1"}, name="own.json")
    discover_records(_spec(own, tmp_path / "cache"))
    assert set(s3.flaky.credentials) == {"AKIDFROMENTRY"}
    s3.flaky.credentials.clear()
    env = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url}, name="env.json")
    discover_records(_spec(env, tmp_path / "cache"))
    assert set(s3.flaky.credentials) == {ACCESS_KEY}


def test_no_such_bucket_names_the_entry_and_the_fix(s3, tmp_path: Path) -> None:
    loader = _loader(tmp_path, {"aws_bucket_name": "expertune-never-created", "aws_endpoint_url": s3.endpoint})
    with pytest.raises(DataError) as error:
        discover_records(_spec(loader, tmp_path / "cache"))
    message = str(error.value)
    assert "'bucket-images'" in message and "'expertune-never-created'" in message
    assert "does not exist" in message and "aws_bucket_name" in message and error.value.exit_code == 2


@pytest.mark.parametrize("code, words", [("AccessDenied", "access denied"),
                                         ("InvalidAccessKeyId", "the credentials were refused")])
def test_refused_requests_name_the_entry_and_the_fix(s3, tmp_path: Path, code: str, words: str) -> None:
    bucket = s3.bucket()
    s3.flaky.fail(f"/{bucket}", 1, f"403:{code}")  # the server's answer to the first listing request
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url})
    with pytest.raises(DataError) as error:
        discover_records(_spec(loader, tmp_path / "cache"))
    assert "'bucket-images'" in str(error.value) and words in str(error.value)
    assert "aws_access_key_id" in str(error.value)


def test_endpoint_down_is_a_clear_error(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(remote, "REQUEST_ATTEMPTS", 1)  # no backoff waits: nothing listens there
    loader = _loader(tmp_path, {"aws_bucket_name": "x", "aws_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(DataError) as error:
        discover_records(_spec(loader, tmp_path / "cache"))
    assert "cannot be reached" in str(error.value) and "aws_endpoint_url" in str(error.value)


def test_no_credentials_anywhere_is_a_clear_error(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    loader = _loader(tmp_path, {"aws_bucket_name": "x", "aws_endpoint_url": s3.endpoint})
    with pytest.raises(DataError) as error:
        discover_records(_spec(loader, tmp_path / "cache"))
    assert "no credentials found" in str(error.value) and "AWS_ACCESS_KEY_ID" in str(error.value)


# ---- reading -----------------------------------------------------------------------------------------


def test_transient_errors_are_absorbed_by_retries(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "READ_BACKOFF_S", 0.01)
    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 2))
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url}), tmp_path / "cache")
    dataset = remote.S3Dataset(spec)
    s3.flaky.fail("/shape_0.png", 2, "503")  # botocore's own retries (standard mode)
    s3.flaky.fail("/shape_1.png", 2, "cut")  # a body cut short: read again by expertune
    jobs = [(f"shape_{i}.png", None) for i in range(2)]
    assert dataset.fetch_many(jobs) == {}
    for i in range(2):
        assert dataset.local_path(f"shape_{i}.png").read_bytes() == \
            (tmp_path / "images" / f"shape_{i}.png").read_bytes()
    assert s3.flaky.rules == {"/shape_0.png": [], "/shape_1.png": []}  # every failure was served
    # More failures than attempts: reported for that key, and no partial file is left.
    dataset.local_path("shape_1.png").unlink()
    s3.flaky.fail("/shape_1.png", remote.READ_ATTEMPTS, "cut")
    reason = dataset.fetch("shape_1.png")
    assert reason is not None and f"cannot be read after {remote.READ_ATTEMPTS} attempts" in reason
    assert sorted(p.name for p in dataset.local_path("shape_1.png").parent.iterdir()) == ["shape_0.png"]


def test_a_vanished_key_is_reported_not_fatal(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 1))
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint}), tmp_path / "cache")
    dataset = remote.S3Dataset(spec)
    s3.client.delete_object(Bucket=bucket, Key="shape_0.png")
    reason = dataset.fetch("shape_0.png")
    assert reason == f"object s3://{bucket}/shape_0.png no longer exists (it was deleted after the bucket was listed)"
    assert not dataset.local_path("shape_0.png").exists()


# ---- the whole data stage, and training -------------------------------------------------------------


@pytest.mark.integration
def test_a_key_deleted_between_listing_and_reading_is_skipped_and_listed(
        s3, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expertune.config import load_config
    from expertune import prepare

    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 3))
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint})
    listed = prepare.discover_records

    def list_then_delete(spec, index=None):
        found = listed(spec, index)
        s3.client.delete_object(Bucket=bucket, Key="shape_1.png")  # after the listing, before any read
        return found

    monkeypatch.setattr(prepare, "discover_records", list_then_delete)
    config, _ = load_config([f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={loader}",
                             "--resolution=64"])
    prepared = prepare.cache_only(config, progress=False)
    assert [Path(e["path"]).name for e in prepared.skipped] == ["shape_1.png"]
    assert prepared.skipped[0]["dataset"] == "bucket-images"
    assert f"s3://{bucket}/shape_1.png no longer exists" in prepared.skipped[0]["reason"]
    assert sorted(item.record.remote_key for item in prepared.unique_items) == ["shape_0.png", "shape_2.png"]
    assert prepared.cache_stats["latents_encoded"] == 2


@pytest.mark.integration
def test_both_stages_train_from_a_bucket_and_share_caches(s3, tmp_path: Path, tiny_model_dir: Path) -> None:
    from helpers import FAST_FLAGS, write_stage_env
    from expertune.config import load_config
    from expertune.train.loop import train

    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 4), prefix="shapes/")
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url,
                                "aws_data_prefix": "shapes/"})
    runs = []
    for stage in (1, 2):
        s3.flaky.requests.clear()
        env = write_stage_env(tmp_path, stage, tiny_model_dir, tmp_path / f"stage{stage}", loader)
        config, _ = load_config(["--env", str(env), *FAST_FLAGS, "--max_train_steps=2"])
        result = train(config)
        runs.append((json.loads((result.output_dir / "run.json").read_text()), list(s3.flaky.requests)))
    (run1, requests1), (run2, requests2) = runs
    # Four images, four captions plus the validation prompt: made by stage 1, found by stage 2.
    assert run1["cache"] == {"latents_encoded": 4, "latents_reused": 0, "embeds_encoded": 5, "embeds_reused": 0}
    assert run2["cache"] == {"latents_encoded": 0, "latents_reused": 4, "embeds_encoded": 0, "embeds_reused": 5}
    image_gets = lambda requests: sorted(p for m, p in requests if m == "GET" and p.endswith(".png"))  # noqa: E731
    assert image_gets(requests1) == [f"/{bucket}/shapes/shape_{i}.png" for i in range(4)]
    # Stage 2 lists the bucket once and reads no object at all: sizes and ETags match the file index.
    assert image_gets(requests2) == [] and not [p for m, p in requests2 if m == "GET" and p.endswith(".txt")]
    assert run1["skipped_images"] == run2["skipped_images"] == []


def test_the_cli_exits_2_naming_the_entry(s3, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from expertune.cli import main

    loader = _loader(tmp_path, {"aws_bucket_name": "expertune-no-such-bucket", "aws_endpoint_url": s3.endpoint})
    assert main(["audit", str(loader), "--cache_dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("expertune: error: dataset 'bucket-images'") and "does not exist" in error


def test_the_mirror_is_refetched_when_the_object_changes_even_at_the_same_size(s3, tmp_path: Path) -> None:
    from expertune.data.mirror import fetch_records, is_current

    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="a.png", Body=b"A" * 100)
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url,
                                "caption_strategy": "filename"})
    spec = _spec(loader, tmp_path / "cache")
    index = FileIndex(tmp_path / "index.jsonl")
    (record,) = discover_records(spec, index).records
    assert not is_current(record, index)
    assert fetch_records(spec, [record], index) == {} and record.path.read_bytes() == b"A" * 100
    assert is_current(record, index)
    s3.flaky.requests.clear()
    assert fetch_records(spec, [record], index) == {} and s3.flaky.requests == []  # mirrored: not fetched again
    s3.client.put_object(Bucket=bucket, Key="a.png", Body=b"B" * 100)  # same size, new ETag
    (changed,) = discover_records(spec, index).records
    assert changed.stamp.version != record.stamp.version and not is_current(changed, index)
    assert fetch_records(spec, [changed], index) == {} and changed.path.read_bytes() == b"B" * 100


# ---- hostile keys, oversized objects (issue 20) ------------------------------------------------------


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_hostile_keys_are_skipped_and_listed_and_nothing_is_written_outside(s3, tmp_path: Path) -> None:
    from expertune.data.mirror import fetch_records

    bucket = s3.bucket()
    outside = tmp_path / "outside"
    good = b"\x89PNG good bytes"
    hostile = {
        f"data/{outside}/evil.png": "absolute path",  # data//tmp/.../outside/evil.png
        "data/sub/../../escape.png": "'..' component",
        "data/" + "n" * 300 + ".png": "304 bytes",
        "data/a.png": "also a folder",  # beside data/a.png/b.png: a clash
    }
    for key in [*hostile, "data/a.png/b.png", "data/ok.png", "data/deep/ok.png"]:
        s3.client.put_object(Bucket=bucket, Key=key, Body=good)
    cache = tmp_path / "cache"
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "aws_data_prefix": "data/", "caption_strategy": "filename"}), cache)
    index = FileIndex(tmp_path / "index.jsonl")
    found = discover_records(spec, index)
    assert sorted(record.remote_key for record in found.records) == ["data/a.png/b.png", "data/deep/ok.png",
                                                                   "data/ok.png"]
    reasons = {skip.reason.split("'")[1]: skip.reason for skip in found.skipped}
    assert set(reasons) == set(hostile), found.skipped
    for key, words in hostile.items():
        assert words in reasons[key], reasons[key]
    assert fetch_records(spec, found.records, index) == {}
    mirror = cache / "objects" / bucket / "data"
    assert _files_under(mirror) == {"a.png/b.png", "deep/ok.png", "ok.png"}
    assert not outside.exists() and not (cache / "objects" / bucket / "escape.png").exists()
    # The fetch itself refuses a hostile key handed to it directly: nothing is written, the reason is returned.
    dataset = remote.S3Dataset(spec)
    for key in hostile:
        if key != "data/a.png":
            assert "is not mirrored" in (dataset.fetch(key) or "")
    assert not outside.exists() and _files_under(mirror) == {"a.png/b.png", "deep/ok.png", "ok.png"}


def test_a_manifest_row_that_leaves_the_mirror_is_skipped_not_fatal(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="data/ok.png", Body=b"bytes")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"path": path, "caption": "c"}) + "\n"
                                for path in ["ok.png", "/../../x.png", "/etc/evil.png", "a//b.png"]))
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "aws_data_prefix": "data/", "manifest": str(manifest)}), tmp_path / "cache")
    found = discover_records(spec, FileIndex(None))
    assert [record.remote_key for record in found.records] == ["data/ok.png"]
    assert len(found.skipped) == 3 and all("is not mirrored" in skip.reason for skip in found.skipped)
    assert [skip.reason.endswith(f"line {line})") for line, skip in zip((2, 3, 4), found.skipped)] == [True] * 3


def test_an_object_over_the_size_cap_is_skipped_unread(s3, tmp_path: Path) -> None:
    from expertune.data.mirror import fetch_records

    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="big.png", Body=b"B" * 5000)
    s3.client.put_object(Bucket=bucket, Key="small.png", Body=b"S" * 500)
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.flaky.url,
                                    "caption_strategy": "filename", "aws_max_object_bytes": 1000}), tmp_path / "cache")
    assert spec.remote.max_object_bytes == 1000
    index = FileIndex(None)
    records = discover_records(spec, index).records
    s3.flaky.requests.clear()
    failures = fetch_records(spec, records, index)
    assert list(failures) == ["big.png"] and "over the entry's aws_max_object_bytes (1000)" in failures["big.png"]
    assert [p for m, p in s3.flaky.requests if m == "GET"] == [f"/{bucket}/small.png"]  # big.png never read
    assert not remote.S3Dataset(spec).local_path("big.png").exists()
    assert remote.S3Dataset(spec).local_path("small.png").read_bytes() == b"S" * 500
    # Bigger than listed (a replaced object): the stream stops at the cap, nothing is kept.
    s3.client.put_object(Bucket=bucket, Key="small.png", Body=b"G" * 3000)
    reason = remote.S3Dataset(spec).fetch("small.png")
    assert reason is not None and "aws_max_object_bytes (1000)" in reason
    assert remote.S3Dataset(spec).local_path("small.png").read_bytes() == b"S" * 500


def test_a_full_disk_while_mirroring_stops_with_the_storage_error(s3, tmp_path: Path, small_disk) -> None:
    from expertune.data.mirror import fetch_records
    from expertune.errors import StorageError

    bucket = s3.bucket()
    for index in range(3):
        s3.client.put_object(Bucket=bucket, Key=f"img{index}.png", Body=bytes([index]) * 700_000)
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "caption_strategy": "filename"}), small_disk.path / "cache")
    records = discover_records(spec, FileIndex(None)).records
    with pytest.raises(StorageError, match=r"img\d.png: the disk is full") as raised:
        fetch_records(spec, records, FileIndex(None))
    assert raised.value.exit_code == 3
    mirror = small_disk.path / "cache" / "objects" / bucket
    assert all(path.stat().st_size == 700_000 for path in mirror.rglob("*") if path.is_file())  # no partial file
    assert not [path for path in mirror.rglob(".*.tmp")]


def test_an_object_that_cannot_be_written_where_it_belongs_is_skipped(s3, tmp_path: Path) -> None:
    from expertune.data.mirror import fetch_records

    bucket = s3.bucket()
    for key in ("a.png", "b.png"):
        s3.client.put_object(Bucket=bucket, Key=key, Body=b"bytes of " + key.encode())
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                    "caption_strategy": "filename"}), tmp_path / "cache")
    dataset = remote.S3Dataset(spec)
    (dataset.local_path("a.png") / "left-by-an-older-listing").mkdir(parents=True)  # a folder in the file's place
    index = FileIndex(None)
    failures = fetch_records(spec, discover_records(spec, index).records, index)
    assert list(failures) == ["a.png"] and "cannot be written to" in failures["a.png"]
    assert dataset.local_path("b.png").read_bytes() == b"bytes of b.png"
    assert dataset.local_path("a.png").is_dir()


def test_a_caption_object_over_a_mebibyte_is_not_read_into_memory(s3, tmp_path: Path) -> None:
    bucket = s3.bucket()
    for name, caption in (("a", b"a small caption"), ("b", b"x" * (remote.SMALL_OBJECT_BYTES + 1))):
        s3.client.put_object(Bucket=bucket, Key=f"{name}.png", Body=b"image")
        s3.client.put_object(Bucket=bucket, Key=f"{name}.txt", Body=caption)
    spec = _spec(_loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint}), tmp_path / "cache")
    found = discover_records(spec, FileIndex(None))
    assert [record.remote_key for record in found.records] == ["a.png"]
    (skip,) = found.skipped
    assert f"is {remote.SMALL_OBJECT_BYTES + 1} bytes, over {remote.SMALL_OBJECT_BYTES} bytes" in skip.reason


@pytest.mark.integration
def test_a_run_over_hostile_keys_goes_on_and_lists_them(s3, tmp_path: Path, tiny_model_dir: Path) -> None:
    from expertune.config import load_config
    from expertune import prepare

    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 2), prefix="data/")
    outside = tmp_path / "outside"
    png = (tmp_path / "images" / "shape_0.png").read_bytes()
    hostile = [f"data/{outside}/evil.png", "data/../escape.png", "data/" + "n" * 300 + ".png", "data/shape_1.png/x.png"]
    for key in hostile:
        s3.client.put_object(Bucket=bucket, Key=key, Body=png)
        s3.client.put_object(Bucket=bucket, Key=key[:-4] + ".txt", Body=b"a caption")
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint, "aws_data_prefix": "data/"})
    config, _ = load_config([f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={loader}",
                             "--resolution=64", f"--cache_dir={tmp_path / 'cache'}"])
    prepared = prepare.cache_only(config, progress=False)
    reasons = " | ".join(entry["reason"] for entry in prepared.skipped)
    assert len(prepared.skipped) == 4 and "absolute path" in reasons and "'..' component" in reasons
    assert "304 bytes" in reasons and "'data/shape_1.png' is also a folder" in reasons
    # shape_1.png is also the folder of data/shape_1.png/x.png: that file is kept out, the deeper key is used.
    assert sorted(item.record.remote_key for item in prepared.unique_items) == [
        "data/shape_0.png", "data/shape_1.png/x.png"]
    assert prepared.cache_stats["latents_encoded"] == 1  # x.png holds shape_0.png's bytes: one shared entry
    assert not outside.exists() and not (tmp_path / "cache" / "objects" / bucket / "escape.png").exists()
