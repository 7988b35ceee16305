"""A CLIP tokenizer in which every word of the world is one token.

CLIP's byte-level BPE with no merges spells each word in characters, so a colour is 3-6 tokens at positions
that move with the other words. Here the merges are chosen so that each world word collapses to a single
`word</w>` token; every other text still encodes, byte by byte, through the same 256-symbol alphabet.
"""

from __future__ import annotations

import os
from pathlib import Path

from expertune.models.tiny import MAX_TOKENS, _byte_symbols
from expertune.world.scene import WORDS


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: the lowest-ranked adjacent pair merges first, until none is ranked."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if (a, b) in ranks]
        if not pairs:
            break
        _rank, index = min(pairs)
        parts = parts[:index] + [parts[index] + parts[index + 1]] + parts[index + 2:]
    return parts


def word_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """Merges that make each of `words` one token.

    Each new merge joins the first two pieces of a word that is still split; being ranked last, it can never
    pre-empt a merge an earlier word relies on, so words already whole stay whole.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def world_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_world_tokenizer(directory: str | os.PathLike, pad_token: str = "<|endoftext|>") -> Path:
    """Save a `CLIPTokenizer` with one token per world word into `directory`; returns it."""
    from transformers import CLIPTokenizer

    merges = word_merges()
    tokenizer = CLIPTokenizer(vocab=world_vocabulary(merges), merges=list(merges),
                              pad_token=pad_token, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(directory))
    return Path(directory)
