"""The tiny world: flat-colour shapes on flat-colour backgrounds, drawn deterministically from a seed.

Captions follow one exact grammar, ``a {fg} {shape} on a {bg} background``, so anyone can judge an image
against its prompt by reading two colours (the border is the background, the centre the shape) and one
outline. Size, position and rotation vary but never enter the caption. Some (fg, bg, shape) combinations
are held out of pretraining (`HELD_OUT`), so that generalisation to unseen combinations can be measured
and a fine-tune can teach something visible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
WORDS: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLOURS)
IMAGE_SIZE = 64
SUPERSAMPLE = 4
# Shape geometry, as fractions of the image side: circumradius and the centre's offset from the middle.
# The largest shape with the largest offset stays clear of the border, and every shape covers the centre.
RADIUS_RANGE = (0.27, 0.38)
MAX_OFFSET = 0.07


@dataclass(frozen=True)
class Combination:
    """What a caption says: the shape's colour, the shape, the background's colour."""

    fg: str
    shape: str
    bg: str

    @property
    def caption(self) -> str:
        return f"a {self.fg} {self.shape} on a {self.bg} background"


def all_combinations() -> list[Combination]:
    """Every (fg, shape, bg) with fg != bg: 8 x 7 x 3 = 168, in a fixed order."""
    return [Combination(fg, shape, bg) for fg in COLOURS for bg in COLOURS if fg != bg for shape in SHAPES]


def held_out_combinations(count: int = 12, seed: int = 1234) -> list[Combination]:
    """A seeded choice of combinations kept out of pretraining; each colour and shape still appears in training.

    No two held-out combinations share their (fg, bg) pair, so every colour pairing stays visible in some shape.
    """
    rng = random.Random(seed)
    pool = all_combinations()
    rng.shuffle(pool)
    chosen: list[Combination] = []
    pairs: set[tuple[str, str]] = set()
    for combination in pool:
        if (combination.fg, combination.bg) in pairs:
            continue
        chosen.append(combination)
        pairs.add((combination.fg, combination.bg))
        if len(chosen) == count:
            break
    return sorted(chosen, key=all_combinations().index)


HELD_OUT: tuple[Combination, ...] = tuple(held_out_combinations())


def training_combinations() -> list[Combination]:
    """The combinations the world model is pretrained on (all but `HELD_OUT`)."""
    held = set(HELD_OUT)
    return [c for c in all_combinations() if c not in held]


def parse_caption(caption: str) -> Combination:
    """The combination a world caption names; ValueError for text outside the grammar."""
    words = caption.strip().split()
    if (len(words) != 7 or words[0] != "a" or words[3] != "on" or words[4] != "a" or words[6] != "background"
            or words[1] not in PALETTE or words[5] not in PALETTE or words[2] not in SHAPES or words[1] == words[5]):
        raise ValueError(f"not a world caption (expected 'a {{fg}} {{shape}} on a {{bg}} background'): {caption!r}")
    return Combination(words[1], words[2], words[5])


@dataclass(frozen=True)
class Scene:
    """One image of the world: its combination plus the geometry the caption does not mention."""

    combination: Combination
    radius: float  # circumradius, fraction of the side
    centre: tuple[float, float]  # fractions of the side
    rotation: float  # radians

    @property
    def caption(self) -> str:
        return self.combination.caption


def random_scene(combination: Combination, rng: random.Random,
                 radius_range: tuple[float, float] = RADIUS_RANGE) -> Scene:
    radius = rng.uniform(*radius_range)
    centre = (0.5 + rng.uniform(-MAX_OFFSET, MAX_OFFSET), 0.5 + rng.uniform(-MAX_OFFSET, MAX_OFFSET))
    return Scene(combination, radius, centre, rng.uniform(0.0, 2.0 * math.pi))


def scenes(combinations: list[Combination], per_combination: int, seed: int,
           radius_range: tuple[float, float] = RADIUS_RANGE) -> list[Scene]:
    """`per_combination` seeded scenes of each combination, in combination order (`radius_range`: the
    circumradii drawn; the world's own by default)."""
    rng = random.Random(seed)
    return [random_scene(c, rng, radius_range) for c in combinations for _ in range(per_combination)]


def _polygon(scene: Scene, corners: int, side: float) -> list[tuple[float, float]]:
    cx, cy = scene.centre[0] * side, scene.centre[1] * side
    r = scene.radius * side
    return [(cx + r * math.cos(scene.rotation + 2 * math.pi * k / corners),
             cy + r * math.sin(scene.rotation + 2 * math.pi * k / corners)) for k in range(corners)]


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene at `size` px, anti-aliased by drawing at 4x and box-filtering down."""
    side = size * SUPERSAMPLE
    combination = scene.combination
    image = Image.new("RGB", (side, side), PALETTE[combination.bg])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[combination.fg]
    if combination.shape == "circle":
        cx, cy, r = scene.centre[0] * side, scene.centre[1] * side, scene.radius * side
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene, 4 if combination.shape == "square" else 3, side), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def render_batch(batch: list[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Scenes as one uint8 array (N, size, size, 3)."""
    return np.stack([np.asarray(render(s, size)) for s in batch])


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest to an RGB triple (Euclidean in RGB)."""
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)
    distance = ((table - np.asarray(rgb, dtype=np.float64)[None, :]) ** 2).sum(axis=1)
    return names[int(distance.argmin())]


def read_colours(image: Image.Image) -> tuple[str, str]:
    """(centre colour, border colour) read off an image: the judge of whether it draws its prompt's colours.

    The centre is the median of the middle eighth of the image (always inside the shape), the border the
    median of the outermost 1/16 ring (always background).
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = array.shape[:2]
    cy, cx, half = h // 2, w // 2, max(1, h // 16)
    centre = np.median(array[cy - half:cy + half, cx - half:cx + half].reshape(-1, 3), axis=0)
    ring = max(1, h // 16)
    mask = np.ones((h, w), dtype=bool)
    mask[ring:h - ring, ring:w - ring] = False
    border = np.median(array[mask].reshape(-1, 3), axis=0)
    return nearest_colour(centre), nearest_colour(border)
