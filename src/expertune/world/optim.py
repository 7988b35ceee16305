"""The learning-rate shape every world part trains with."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total: int, warmup: int = 100, floor: float = 0.02) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine from 1 down to `floor` at `total`."""
    return lambda step: min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))
