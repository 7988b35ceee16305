"""The resolution rules (expertune.resolution), and that both places a resolution is given apply them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from expertune.config import load_config
from expertune.data.dataloader import load_dataloader_config
from expertune.errors import ConfigError
from expertune.resolution import (
    MAX_MEGAPIXELS,
    RESOLUTION_TYPES,
    implausible_megapixels,
    nearest_multiples_of_8,
    resolution_problem,
    resolution_value,
)

# (resolution, resolution_type, problem as a dataset's resolution, problem as the run's --resolution)
RULES = [
    (1024, "pixel", None, None),
    (8, "pixel", None, None),
    (1020, "pixel", "multiple_of_8", None),  # a bucket's shorter edge must be whole latents
    (1020, "pixel_area", None, None),  # rounded to the alignment, never used as an edge as is
    (1000.5, "pixel", "whole_pixels", "whole_pixels"),
    (1.5, "pixel_area", "whole_pixels", "whole_pixels"),
    (4, "pixel", "whole_pixels", "whole_pixels"),
    (0.25, "area", None, None),
    (1.0, "area", None, None),
    (MAX_MEGAPIXELS, "area", None, None),
    (17, "area", "megapixels", "megapixels"),
    (1024, "area", "megapixels", "megapixels"),
]


@pytest.mark.parametrize("resolution, resolution_type, as_dataset, as_run", RULES)
def test_resolution_rules(resolution: float, resolution_type: str, as_dataset: str | None, as_run: str | None) -> None:
    assert resolution_type in RESOLUTION_TYPES
    assert resolution_problem(resolution, resolution_type) == as_dataset
    assert resolution_problem(resolution, resolution_type, bucket_edge=False) == as_run


def test_resolution_values_and_fixes() -> None:
    assert resolution_value(1024.0, "pixel") == 1024 and isinstance(resolution_value(1024.0, "pixel"), int)
    assert resolution_value(768.0, "pixel_area") == 768 and isinstance(resolution_value(768.0, "pixel_area"), int)
    assert resolution_value(1, "area") == 1.0 and isinstance(resolution_value(1, "area"), float)
    assert nearest_multiples_of_8(1020) == (1016, 1024) and nearest_multiples_of_8(30) == (24, 32)
    assert not implausible_megapixels(16) and implausible_megapixels(16.5)


def _dataset_error(tmp_path: Path, entry: dict[str, object]) -> str:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.png")
    path = tmp_path / "loader.json"
    path.write_text(json.dumps([{"id": "d", "instance_data_dir": str(tmp_path / "imgs"), **entry}]))
    with pytest.raises(ConfigError) as info:
        load_dataloader_config(path, default_resolution=64, default_cache_dir=tmp_path / "cache")
    return str(info.value)


@pytest.mark.parametrize("resolution, resolution_type, as_dataset, as_run", [r for r in RULES if r[2] or r[3]])
def test_both_places_refuse_what_the_rules_refuse(
    tmp_path: Path, resolution: float, resolution_type: str, as_dataset: str | None, as_run: str | None
) -> None:
    words = {"megapixels": "megapixels", "whole_pixels": "whole number of pixels >= 8", "multiple_of_8": "multiple of 8"}
    message = _dataset_error(tmp_path, {"resolution": resolution, "resolution_type": resolution_type})
    assert as_dataset is not None and words[as_dataset] in message and "field 'resolution'" in message
    argv = [f"--resolution={resolution}", f"--resolution_type={resolution_type}"]
    if as_run is None:
        config, _ = load_config(argv)  # the run's resolution is only a default: datasets may set their own
        assert config.data.resolution == resolution
    else:
        with pytest.raises(ConfigError, match=words[as_run]):
            load_config(argv)
