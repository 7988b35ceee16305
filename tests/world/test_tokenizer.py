"""One token per world word, and any other text still encodes."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from expertune.world.scene import WORDS, all_combinations
from expertune.world.tokenizer import _bpe, word_merges, write_world_tokenizer


def test_each_world_word_is_one_token_at_a_fixed_position(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(write_world_tokenizer(tmp_path / "tok", pad_token="!")))
    for word in WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    lengths = {len(tokenizer(c.caption).input_ids) for c in all_combinations()}
    assert lengths == {9}  # <bos> + 7 words + <eos>: the colour is always token 2, the background token 6
    padded = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.convert_tokens_to_ids("!")
    # Text outside the world still encodes, byte by byte, and round-trips.
    assert tokenizer.decode(tokenizer("an astronaut, riding?").input_ids, skip_special_tokens=True) == "an astronaut , riding ?"


def test_merges_never_break_an_earlier_word() -> None:
    merges = word_merges()
    ranks = {pair: index for index, pair in enumerate(merges)}
    assert all(_bpe(word, ranks) == [word + "</w>"] for word in WORDS)
    assert len(merges) == len(set(merges))
