"""The world's grammar, palette and held-out split, and the colour judge on drawn images."""

from __future__ import annotations

import numpy as np
import pytest

from expertune.world.scene import (COLOURS, HELD_OUT, PALETTE, SHAPES, all_combinations, parse_caption,
                                   read_colours, render, render_batch, scenes, training_combinations)


def test_palette_and_grammar_are_the_specified_ones() -> None:
    assert PALETTE == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
                       "yellow": (235, 210, 40), "white": (245, 245, 245), "black": (20, 20, 20),
                       "orange": (245, 140, 30), "purple": (140, 60, 190)}
    combinations = all_combinations()
    assert len(combinations) == 8 * 7 * 3 == len(set(combinations))
    assert all(c.fg != c.bg for c in combinations)
    assert combinations[0].caption == "a red circle on a green background"
    assert parse_caption("a purple triangle on a orange background").caption == "a purple triangle on a orange background"
    for bad in ("a red circle on a red background", "a pink circle on a blue background", "a red circle"):
        with pytest.raises(ValueError, match="not a world caption"):
            parse_caption(bad)


def test_held_out_combinations_leave_every_word_in_training() -> None:
    assert len(HELD_OUT) == 12 and not set(HELD_OUT) & set(training_combinations())
    assert len(training_combinations()) == 168 - 12
    train = training_combinations()
    assert {c.fg for c in train} == {c.bg for c in train} == set(COLOURS) and {c.shape for c in train} == set(SHAPES)
    assert len({(c.fg, c.bg) for c in HELD_OUT}) == 12  # no colour pair is held out in more than one shape


def test_rendering_is_deterministic_and_the_judge_reads_every_drawn_image() -> None:
    drawn = scenes(all_combinations(), 2, seed=5)
    first, again = render_batch(drawn), render_batch(scenes(all_combinations(), 2, seed=5))
    assert first.shape == (336, 64, 64, 3) and first.dtype == np.uint8 and np.array_equal(first, again)
    assert not np.array_equal(first, render_batch(scenes(all_combinations(), 2, seed=6)))
    # The judge (centre and border colours) is right on every drawn image: it can judge generated ones.
    assert all(read_colours(render(s)) == (s.combination.fg, s.combination.bg) for s in drawn)
    # Geometry varies, the colours of the caption do not.
    sizes = {round(s.radius, 3) for s in drawn}
    assert len(sizes) > 100
