"""Held-out images for the per-band validation loss: a whole dataset, or a seeded fraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertune.data.batches import TrainingItem
from expertune.data.holdout import split_holdout
from expertune.data.dataloader import DatasetSpec
from expertune.data.records import ImageRecord
from expertune.errors import ConfigError, DataError


def _items(dataset: str, count: int, repeats: int = 0) -> list[TrainingItem]:
    spec = DatasetSpec(id=dataset, instance_data_dir=Path(f"/d/{dataset}"), caption_strategy="textfile",
                       instance_prompt=None, resolution=64, crop_style="center", cache_dir_vae=Path("/c"),
                       repeats=repeats, disable_validation=False)
    return [TrainingItem(ImageRecord(Path(f"/d/{dataset}/{i}.png"), (f"caption {i}",), dataset), spec)
            for i in range(count) for _ in range(1 + repeats)]


def _keys(items: list[TrainingItem]) -> set[tuple[str, str]]:
    return {(i.spec.id, str(i.record.path)) for i in items}


def test_nothing_is_held_out_by_default() -> None:
    items = _items("a", 3)
    assert split_holdout(items, eval_dataset_id=None, fraction=None, seed=0) == (items, [])


def test_a_named_dataset_is_held_out_whole_with_its_repeats() -> None:
    items = _items("train", 4) + _items("faces", 3, repeats=2)
    training, held = split_holdout(items, eval_dataset_id="faces", fraction=None, seed=0,
                                   dataset_ids=["train", "faces"])
    assert {i.spec.id for i in training} == {"train"} and len(training) == 4
    assert len(held) == 3 and {i.spec.id for i in held} == {"faces"}  # each image once
    with pytest.raises(ConfigError, match="eval_dataset_id='face' is not a dataset.*faces, train"):
        split_holdout(items, eval_dataset_id="face", fraction=None, seed=0, dataset_ids=["train", "faces"])
    with pytest.raises(DataError, match="nothing is left to train on"):
        split_holdout(_items("faces", 2), eval_dataset_id="faces", fraction=None, seed=0)


def test_a_fraction_is_a_seeded_choice_independent_of_order() -> None:
    items = _items("a", 6, repeats=1) + _items("b", 4)
    training, held = split_holdout(items, eval_dataset_id=None, fraction=0.25, seed=3)
    assert len(held) == 2  # round(0.25 * 10 images)
    assert not _keys(training) & _keys(held) and _keys(training) | _keys(held) == _keys(items)
    assert len(training) == len(items) - sum(1 + i.spec.repeats for i in held)
    again = split_holdout(list(reversed(items)), eval_dataset_id=None, fraction=0.25, seed=3)[1]
    assert _keys(again) == _keys(held)
    others = {frozenset(_keys(split_holdout(items, eval_dataset_id=None, fraction=0.25, seed=s)[1]))
              for s in range(6)}
    assert len(others) > 1  # the seed chooses
    assert len(split_holdout(_items("a", 3), eval_dataset_id=None, fraction=0.01, seed=0)[1]) == 1  # at least one
