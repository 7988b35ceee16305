"""Images held out from training for the per-band validation loss.

Either a whole dataset of the dataloader JSON (`eval_dataset_id`) or a seeded fraction of the images
(`eval_holdout_fraction`). A held-out image leaves training with all its repeats; the choice depends only
on the seed and the set of images, never on the order datasets were discovered in.
"""

from __future__ import annotations

from typing import Sequence

import torch

from expertune.data.batches import TrainingItem
from expertune.errors import ConfigError, DataError


def _image_key(item: TrainingItem) -> tuple[str, str]:
    return item.spec.id, str(item.record.path)


def split_holdout(
    items: Sequence[TrainingItem],
    *,
    eval_dataset_id: str | None,
    fraction: float | None,
    seed: int,
    dataset_ids: Sequence[str] = (),
) -> tuple[list[TrainingItem], list[TrainingItem]]:
    """(training items, held-out items with each image once). Neither option set: nothing is held out.

    `dataset_ids` are every dataset of the dataloader JSON (named in the error for an unknown id).
    Raises ConfigError for an unknown dataset id and DataError when nothing would be left to train on.
    """
    if eval_dataset_id is None and fraction is None:
        return list(items), []
    unique: dict[tuple[str, str], TrainingItem] = {}
    for item in items:
        unique.setdefault(_image_key(item), item)
    if eval_dataset_id is not None:
        known = sorted(set(dataset_ids) | {key[0] for key in unique})
        if eval_dataset_id not in known:
            raise ConfigError(f"eval_dataset_id={eval_dataset_id!r} is not a dataset of the dataloader JSON; "
                              f"its datasets are: {', '.join(known)}")
        held = {key for key in unique if key[0] == eval_dataset_id}
        what = f"eval_dataset_id={eval_dataset_id!r}"
    else:
        assert fraction is not None
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"eval_holdout_fraction must be in (0, 1), got {fraction}")
        keys = sorted(unique)
        count = min(len(keys), max(1, round(fraction * len(keys))))
        order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
        held = {keys[i] for i in order[:count]}
        what = f"eval_holdout_fraction={fraction}"
    training = [item for item in items if _image_key(item) not in held]
    if not training:
        raise DataError(f"{what} holds out every image ({len(unique)}); nothing is left to train on")
    return training, [unique[key] for key in sorted(held)]
