"""`expertune cache` into a real full file system (a 2 MiB tmpfs mounted by the test): exit 3, one line naming
the file and what to free, no partial file; with space again, the next run finishes what was left (issue 20)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.integration
def test_expertune_cache_on_a_full_disk_stops_cleanly_and_resumes(
        tiny_model_dir: Path, small_disk, capsys: pytest.CaptureFixture) -> None:
    from helpers import FAST_FLAGS
    from expertune.cli import main
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config

    images = small_disk.path.parent / "images"
    for index, (shape, colour, background) in enumerate(SHAPES[:6]):
        save_captioned_image(draw_shape(shape, colour, background, size=96), images / f"shape_{index}.png",
                             f"a {colour} {shape} on a {background} background")
    cache = small_disk.path / "cache"
    loader = write_dataloader_config(small_disk.path.parent / "dataloader.json", images, cache, resolution=64)
    flags = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_backend_config={loader}",
             f"--cache_dir={cache}", *FAST_FLAGS]
    filler = small_disk.fill(leave=12 * 1024)
    capsys.readouterr()
    assert main(["cache", *flags]) == 3
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("expertune: error:")]
    assert len(error) == 1 and "the disk is full" in error[0], error  # (beside tqdm's bars)
    assert str(small_disk.path) in error[0] and "Free space there" in error[0]
    assert not [path for path in small_disk.path.rglob("*") if path.name.endswith(".tmp")]
    filler.unlink()
    assert main(["cache", *flags]) == 0
    entries = list(cache.rglob("*.safetensors"))
    assert len(entries) >= 6 + 6  # six latents, six captions (and the validation prompt's)
