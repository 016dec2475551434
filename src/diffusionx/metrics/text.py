"""Word-level tokenizer of the evaluator's text tower (independent of the generators' BPE)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, CLS, UNK = "<pad>", "<cls>", "<unk>"
SPECIALS = (PAD, CLS, UNK)
MAX_WORDS = 47  # plus <cls> = 48 positions
_WORD = re.compile(r"[a-z]+|[,.;]")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def base_words() -> list[str]:
    from ..world.vocab import COLORS, FUNCTION_WORDS, POSITIONS, SHAPES, SIZES

    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(FUNCTION_WORDS) | {",", ".", ";"}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


class WordTokenizer:
    """Maps text to word ids; any word outside the vocabulary becomes <unk>."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, extra_texts: Iterable[str] = ()) -> WordTokenizer:
        words = set(base_words())
        for text in extra_texts:
            words.update(split_words(text))
        return cls(sorted(words))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 1 + L) int64 ids: <cls> first, then words, then <pad>; L is the longest text's
        word count in this batch (at most MAX_WORDS; longer texts are cut)."""
        unk = self.index[UNK]
        rows = [[self.index.get(w, unk) for w in split_words(str(t))[:MAX_WORDS]] for t in texts]
        out = np.zeros((len(texts), 1 + max((len(r) for r in rows), default=0)), dtype=np.int64)
        out[:, 0] = self.index[CLS]
        for i, ids in enumerate(rows):
            out[i, 1 : 1 + len(ids)] = ids
        return out
