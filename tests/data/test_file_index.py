"""The persistent file index: a restart over unchanged files reads no image bytes; a changed file is read again."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expertune.cache import latents
from expertune.cache.latents import LatentCache
from expertune.data.buckets import BucketRule
from expertune.data.dataloader import DatasetSpec
from expertune.data.file_index import FOLDER_INDEX_NAME, INDEX_NAME, FileIndex, FileStamp, local_stamp
from expertune.data.records import _walk_images, discover_records


def test_index_round_trip_exact_stamps_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    index = FileIndex(path)
    stamp = FileStamp("/data/a.png", 10, "123")
    index.put("image", stamp, {"sha256": "ab", "h": 2, "w": 3})
    index.flush()
    with open(path, "a", encoding="utf-8") as stream:
        stream.write("1\timage\t10\t5\t\"/data/b.png\"\t{\"sha")  # a crash mid-append
    again = FileIndex(path)
    assert again.get("image", stamp) == {"sha256": "ab", "h": 2, "w": 3}
    assert again.get("image", FileStamp("/data/a.png", 10, "124")) is None  # touched
    assert again.get("image", FileStamp("/data/a.png", 11, "123")) is None  # resized
    assert again.get("caption", stamp) is None  # another kind
    assert (again.hits, again.misses) == (1, 3)
    assert len(again) == 1


def test_index_compacts_superseded_lines(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    index = FileIndex(path)
    for version in range(1200):
        index.put("image", FileStamp("/a.png", 1, str(version)), {"v": version})
        index.flush()
    assert len(path.read_text().splitlines()) == 200  # rewritten to one line at the 1,001st, then 199 appended
    assert FileIndex(path).get("image", FileStamp("/a.png", 1, "1199")) == {"v": 1199}


def test_unwritable_index_warns_and_the_run_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    index = FileIndex(tmp_path / "file" / "index.jsonl")  # its folder is a file
    index.put("image", FileStamp("/a.png", 1, "1"), {})
    index.flush()
    assert "cannot be written" in caplog.text
    assert index.get("image", FileStamp("/a.png", 1, "1")) == {}


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae").eval()


def _dataset(root: Path, count: int) -> DatasetSpec:
    rng = np.random.default_rng(3)
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"caption {i}\n")
    return DatasetSpec(id="set", instance_data_dir=folder, caption_strategy="textfile", instance_prompt=None,
                       resolution=32, crop_style="center", cache_dir_vae=root / "latents", repeats=0,
                       disable_validation=False)


class _Reads:
    """Counts every read of image bytes (hashing, header) and of caption files, by path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        digest, size = latents.file_digest, latents.image_size
        read_bytes = Path.read_bytes

        def counted_digest(path, **kw):
            self.paths.append(os.fspath(path))
            return digest(path, **kw)

        def counted_size(path, **kw):
            self.paths.append(os.fspath(path))
            return size(path, **kw)

        def counted_read_bytes(path):
            self.paths.append(os.fspath(path))
            return read_bytes(path)

        monkeypatch.setattr(latents, "file_digest", counted_digest)
        monkeypatch.setattr(latents, "image_size", counted_size)
        monkeypatch.setattr(Path, "read_bytes", counted_read_bytes)


def _plan_all(spec: DatasetSpec, vae, index_path: Path) -> list[str]:
    """What a run's steps 1-2 do: discover, then each image's cache key; the keys."""
    index = FileIndex(index_path)
    cache = LatentCache(vae, seed=0, batch_size=2, index=index)
    records, skipped = discover_records(spec, index)
    assert not skipped
    keys = []
    for record, planned in cache.plan_each(records, spec):  # as prepare does: a folder at a time
        assert not isinstance(planned, Exception), planned
        assert cache.planned(record, spec) is planned  # what `ensure` and `load` then ask costs no lookup
        keys.append(planned.key)
    index.flush()
    return keys


def test_a_restart_reads_no_bytes_and_a_changed_file_is_read_again(
        tmp_path: Path, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _dataset(tmp_path, 5)
    index_path = tmp_path / "cache" / "file_index.jsonl"
    reads = _Reads(monkeypatch)
    cold = _plan_all(spec, vae, index_path)
    assert len(reads.paths) == 5 * 3  # each image hashed and its header read, each caption read
    reads.paths.clear()
    assert _plan_all(spec, vae, index_path) == cold
    assert reads.paths == []  # warm: stat only
    # An edited image and an edited caption are noticed (new size or mtime), and only they are read.
    Image.new("RGB", (48, 40), "red").save(spec.instance_data_dir / "img_2.png")
    (spec.instance_data_dir / "img_4.txt").write_text("a new caption\n")
    stat = os.stat(spec.instance_data_dir / "img_4.txt")
    os.utime(spec.instance_data_dir / "img_4.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    warm = _plan_all(spec, vae, index_path)
    assert sorted(Path(p).name for p in reads.paths) == ["img_2.png", "img_2.png", "img_4.txt"]
    assert warm[:2] == cold[:2] and warm[3:] == cold[3:] and warm[2] != cold[2]
    index = FileIndex(index_path)
    assert discover_records(spec, index).records[4].captions == ("a new caption",)
    assert index.get("image", local_stamp(spec.instance_data_dir / "img_2.png")) is not None


def test_a_restart_plans_no_crop_again_and_other_settings_plan_afresh(
        tmp_path: Path, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _dataset(tmp_path, 3)
    index_path = tmp_path / "cache" / "file_index.jsonl"
    cold = _plan_all(spec, vae, index_path)
    with monkeypatch.context() as patched:
        def no_planning(*args, **kwargs):
            raise AssertionError("a restart over unchanged files planned a crop again")

        patched.setattr(BucketRule, "plan", no_planning)
        assert _plan_all(spec, vae, index_path) == cold  # the remembered plans and keys
        records = discover_records(spec, FileIndex(index_path)).records
        remembered = LatentCache(vae, seed=0, batch_size=2, index=FileIndex(index_path)).planned(records[0], spec)
    fresh = LatentCache(vae, seed=0, batch_size=2).planned(records[0], spec)  # an empty index: planned anew
    assert remembered == fresh
    # Another resolution or seed is another plan: planned afresh (and both are remembered).
    smaller = dataclasses.replace(spec, resolution=24)
    assert _plan_all(smaller, vae, index_path) == [
        LatentCache(vae, seed=0, batch_size=2).planned(r, smaller).key for r in records] != cold
    assert _plan_all(spec, vae, index_path) == cold
    reseeded = LatentCache(vae, seed=1, batch_size=2, index=FileIndex(index_path)).planned(records[0], spec)
    assert reseeded == LatentCache(vae, seed=1, batch_size=2).planned(records[0], spec)


def test_the_walk_stamps_images_and_captions_as_a_stat_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _dataset(tmp_path, 2)
    nested = spec.instance_data_dir / "sub"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "deep.PNG")
    (nested / "deep.txt").write_text("deep\n")
    Image.new("RGB", (8, 8)).save(nested / "uncaptioned.jpg")
    os.symlink(nested, spec.instance_data_dir / "link")  # the same folder twice: walked once
    (spec.instance_data_dir / ".hidden.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    listed = _walk_images(Path("images"))  # a relative directory: identities are absolute
    assert [item.path for item in listed] == [
        os.path.join("images", name) for name in ("img_0.png", "img_1.png", "link/deep.PNG", "link/uncaptioned.jpg")
    ]  # folders in name order, as os.walk goes: "link" before "sub"
    for item in listed:
        assert item.stamp == local_stamp(item.path)
        caption = os.path.splitext(item.path)[0] + ".txt"
        assert item.caption_stamp == (local_stamp(caption) if os.path.exists(caption) else None)
    records, skipped = discover_records(dataclasses.replace(spec, instance_data_dir=Path("images")), FileIndex(None))
    assert [r.captions for r in records] == [("caption 0",), ("caption 1",), ("deep",)]
    assert [Path(s.path).name for s in skipped] == ["uncaptioned.jpg"] and "is missing" in skipped[0].reason


def _plan_without_per_file_lines(spec: DatasetSpec, vae, cache_dir: Path, scratch: Path) -> list[str]:
    """`_plan_all` over a copy of `cache_dir` that has the folder entries only."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    shutil.copy(cache_dir / FOLDER_INDEX_NAME, scratch / FOLDER_INDEX_NAME)
    keys = _plan_all(spec, vae, scratch / INDEX_NAME)
    assert not (scratch / INDEX_NAME).exists()  # nothing was learnt anew
    return keys


def test_unchanged_folders_need_no_per_file_entry_and_an_edit_costs_its_files_only(
        tmp_path: Path, vae, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _dataset(tmp_path, 4)
    cache_dir = tmp_path / "cache"
    index_path = cache_dir / INDEX_NAME
    reads = _Reads(monkeypatch)
    cold = _plan_all(spec, vae, index_path)
    reads.paths.clear()
    # Without the per-file lines an unchanged folder still reads nothing: its two folder entries hold all.
    assert _plan_without_per_file_lines(spec, vae, cache_dir, tmp_path / "scratch") == cold
    assert reads.paths == []
    # A new image (its folder's listing changes): only it is read; the others come from their per-file entries.
    Image.new("RGB", (48, 40), "blue").save(spec.instance_data_dir / "img_9.png")
    (spec.instance_data_dir / "img_9.txt").write_text("caption 9\n")
    grown = _plan_all(spec, vae, index_path)
    assert sorted(Path(p).name for p in reads.paths) == ["img_9.png", "img_9.png", "img_9.txt"]
    assert len(grown) == 5 and set(cold) < set(grown)
    reads.paths.clear()  # the folder entries were rewritten: again, they alone suffice
    assert _plan_without_per_file_lines(spec, vae, cache_dir, tmp_path / "scratch") == grown
    assert reads.paths == []
    # An image rewritten in place (same inode: its folder's mtime does not move) is noticed by its own stamp.
    target = spec.instance_data_dir / "img_1.png"
    folder_mtime = os.stat(spec.instance_data_dir).st_mtime_ns
    replacement = tmp_path / "replacement.png"
    Image.new("RGB", (48, 40), "green").save(replacement)
    with open(target, "r+b") as stream:
        stream.write(replacement.read_bytes())
        stream.truncate()
    assert os.stat(spec.instance_data_dir).st_mtime_ns == folder_mtime
    reads.paths.clear()
    edited = _plan_all(spec, vae, index_path)
    assert [Path(p).name for p in reads.paths] == ["img_1.png", "img_1.png"]
    assert edited[1] != grown[1] and edited[:1] + edited[2:] == grown[:1] + grown[2:]


def test_a_folder_entry_of_another_shape_is_planned_again(tmp_path: Path, vae) -> None:
    spec = _dataset(tmp_path, 2)
    index_path = tmp_path / "cache" / INDEX_NAME
    cold = _plan_all(spec, vae, index_path)
    folders = index_path.with_name(FOLDER_INDEX_NAME)
    text = folders.read_text()
    assert '"p":' in text and '"c":' in text
    folders.write_text(text.replace('"p":{', '"p":{"img_0.png":[1,2],"x":'))  # a torn or foreign plan list
    assert _plan_all(spec, vae, index_path) == cold


def test_a_same_size_same_mtime_edit_changes_the_stamp(tmp_path: Path) -> None:
    from expertune.data.file_index import local_stamp

    path = tmp_path / "a.png"
    path.write_bytes(b"A" * 64)
    before = local_stamp(path)
    stat = path.stat()
    with open(path, "r+b") as stream:  # in place: same inode, same size
        stream.write(b"B")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime put back
    after = local_stamp(path)
    assert (after.size, path.stat().st_mtime_ns) == (before.size, stat.st_mtime_ns) and after != before
    index = FileIndex(tmp_path / "index.jsonl")
    index.put("image", before, {"sha256": "old"})
    assert index.get("image", after) is None


def test_names_that_are_not_utf8_round_trip_through_the_index(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xff.png")  # a surrogate escape, as os.listdir gives it
    stamp = FileStamp(str(tmp_path / name), 3, "1.2.3")
    index = FileIndex(tmp_path / "index.jsonl")
    index.put("image", stamp, {"sha256": "x", "names": {name: 1}})
    index.flush()
    assert (tmp_path / "index.jsonl").read_bytes().isascii()
    assert FileIndex(tmp_path / "index.jsonl").get("image", stamp) == {"sha256": "x", "names": {name: 1}}


def test_a_full_disk_under_the_index_is_a_storage_error(small_disk) -> None:
    from expertune.errors import StorageError

    index = FileIndex(small_disk.path / "index.jsonl")
    index.put("image", FileStamp("/a.png", 1, "1"), {"pad": "x" * 100})
    index.flush()
    small_disk.fill(leave=0)
    index.put("image", FileStamp("/b.png", 1, "1"), {"pad": "y" * 200_000})
    with pytest.raises(StorageError, match="index.jsonl: the disk is full") as raised:
        index.flush()
    assert raised.value.exit_code == 3
    assert FileIndex(small_disk.path / "index.jsonl").get("image", FileStamp("/a.png", 1, "1")) is not None
