"""The world's contrastive training: batches, padding, and what they promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from expertune.world import clip
from expertune.world.scene import RADIUS_RANGE, training_combinations
from expertune.world.tokenizer import write_world_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(write_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")))


def test_padding_to_the_longest_caption_pools_the_same_text_features(tokenizer: CLIPTokenizer) -> None:
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=clip.text_config(clip.EVAL_TEXT, tokenizer),
                                 vision_config=clip.vision_config(64, clip.ClipRecipe()), projection_dim=64))
    captions = ["a red circle on a blue background", "a white square on a black background"]
    short = clip.token_ids(tokenizer, captions, to_longest=True)
    full = clip.token_ids(tokenizer, captions)
    assert short.shape == (2, 9) and full.shape == (2, 77)
    assert torch.allclose(clip._tensor(model.get_text_features(input_ids=short)),
                          clip._tensor(model.get_text_features(input_ids=full)), atol=1e-5)


def _radii(radius_range: tuple[float, float] | None) -> list[float]:
    batches = clip._Batches(training_combinations(), 63, 0, clip.image_processor(32), True, radius_range)
    seen: list[float] = []
    original = clip.scenes

    def recording(*args, **kwargs):
        drawn = original(*args, **kwargs)
        seen.extend(s.radius for s in drawn)
        return drawn

    clip.scenes = recording
    try:
        for _ in range(3):
            captions, pixels = batches.next()
            # whole colour pairs (21 of them; a pair with a held-out combination brings two shapes, not three)
            assert 42 <= len(captions) == len(set(captions)) <= 63 and pixels.shape == (len(captions), 3, 32, 32)
    finally:
        clip.scenes = original
    return seen


def test_batches_draw_the_worlds_sizes_or_the_wider_range_asked_for() -> None:
    world = _radii(None)
    assert RADIUS_RANGE[0] <= min(world) and max(world) <= RADIUS_RANGE[1]
    wide = _radii((0.18, 0.45))
    assert 0.18 <= min(wide) < RADIUS_RANGE[0] and RADIUS_RANGE[1] < max(wide) <= 0.45
