"""Token alignment of two prompts for Prompt-to-Prompt: replace, refine and reweight.

An edit from a source prompt to a target prompt becomes a `TokenEdit` over the text encoder's
token positions (77 for CLIP):

- ``matrix`` (S x T): the target's cross-attention map, during injection, is
  ``P_source @ matrix`` (column t of it mixes the source columns that token t came from);
- ``own`` (T,): the weight of the target's *own* attention column (tokens with no source
  counterpart, such as words a refine inserts);
- both already carry the reweight factors of ``(word:1.5)`` emphasis.

`replace` (same number of words, some swapped) pairs word i with word i, as the P2P paper does;
`refine` (words inserted or removed) aligns the two word lists by a global sequence alignment
(Needleman-Wunsch) and keeps the source attention of every matched word. `make_edit` picks
between them. Words are split on whitespace and punctuation and tokenized one by one, so the
token span of every word is known exactly (CLIP's BPE never merges across words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError

_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")
_WORD = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")
MAX_WEIGHT = 10.0


def parse_weights(prompt: str) -> tuple[str, dict[int, float]]:
    """Strip ``(words:weight)`` emphasis: returns the clean prompt and {word index: weight}
    (word indices as `split_words` counts them in the clean prompt).

    >>> parse_weights("a (red:1.5) circle")
    ('a red circle', {1: 1.5})
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be text, got {type(prompt).__name__}")
    weights: dict[int, float] = {}
    clean_parts: list[str] = []
    n_words = 0
    pos = 0
    for m in _WEIGHT.finditer(prompt):
        before = prompt[pos : m.start()]
        clean_parts.append(before)
        n_words += len(split_words(before))
        inner = m.group(1).strip()
        weight = float(m.group(2))
        if not 0.0 <= weight <= MAX_WEIGHT:
            raise InvalidInputError(f"attention weight must be in [0, {MAX_WEIGHT}], got {weight} in {m.group(0)!r}")
        words = split_words(inner)
        for k in range(len(words)):
            weights[n_words + k] = weight
        n_words += len(words)
        clean_parts.append(inner)
        pos = m.end()
    clean_parts.append(prompt[pos:])
    clean = "".join(clean_parts)
    if "(" in clean or ")" in clean:
        raise InvalidInputError(f"cannot read the emphasis in {prompt!r}: write it as (word:1.5)")
    return clean, weights


def split_words(text: str) -> list[str]:
    """Words and punctuation marks, lower-cased (CLIP's tokenizer lower-cases too)."""
    return [w.lower() for w in _WORD.findall(text)]


def word_token_spans(tokenizer, words: list[str]) -> list[tuple[int, int]]:
    """Token positions [start, end) of each word in the encoded prompt (position 0 is BOS)."""
    spans, pos = [], 1
    for word in words:
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((pos, pos + n))
        pos += n
    return spans


def align_words(source: list[str], target: list[str]) -> list[tuple[int | None, int | None]]:
    """Global alignment (Needleman-Wunsch: match 1, mismatch -1, gap -1) of two word lists.
    Returns (source index or None, target index or None) pairs in order; a pair of two indices
    with different words is a substitution."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = -i
    for j in range(1, m + 1):
        score[0][j] = -j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j] - 1, score[i][j - 1] - 1)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            if score[i][j] == diag:
                pairs.append((i - 1, j - 1))
                i, j = i - 1, j - 1
                continue
        if i > 0 and score[i][j] == score[i - 1][j] - 1:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    return pairs[::-1]


@dataclass
class TokenEdit:
    """How the target prompt's cross-attention is built from the source's (see module doc)."""

    kind: str  # "identity" | "replace" | "refine" | "reweight"
    source_prompt: str
    target_prompt: str  # clean (emphasis stripped)
    matrix: torch.Tensor | None  # (S, T); None = identity
    own: torch.Tensor | None  # (T,); None = all zero
    source_changed: list[int] = field(default_factory=list)  # source token positions edited away
    target_changed: list[int] = field(default_factory=list)  # target token positions that are new
    changed_words: tuple[list[str], list[str]] = ((), ())  # type: ignore[assignment]
    weighted: list[int] = field(default_factory=list)  # target token positions with emphasis

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"


def make_edit(tokenizer, source_prompt: str, target_prompt: str, *, mode: str = "auto") -> TokenEdit:
    """The token edit from `source_prompt` to `target_prompt` (which may carry (word:w) emphasis).

    mode: "auto" (identity if the words are equal, replace if the word counts are equal,
    else refine), "replace" or "refine".
    """
    if mode not in ("auto", "replace", "refine"):
        raise InvalidInputError(f"edit mode must be auto, replace or refine, got {mode!r}")
    source_clean, source_weights = parse_weights(source_prompt)
    target, weights = parse_weights(target_prompt)
    del source_weights  # the source's emphasis is already in its recorded attention
    length = int(tokenizer.model_max_length)
    src_words, tgt_words = split_words(source_clean), split_words(target)
    src_spans = word_token_spans(tokenizer, src_words)
    tgt_spans = word_token_spans(tokenizer, tgt_words)
    if mode == "auto":
        mode = "replace" if len(src_words) == len(tgt_words) else "refine"
    if mode == "replace":
        if len(src_words) != len(tgt_words):
            raise InvalidInputError(
                f"replace needs prompts of the same number of words ({len(src_words)} vs {len(tgt_words)}); use refine"
            )
        pairs: list[tuple[int | None, int | None]] = list(zip(range(len(src_words)), range(len(tgt_words))))
    else:
        pairs = align_words(src_words, tgt_words)

    matrix = torch.zeros(length, length)
    own = torch.zeros(length)
    matrix[0, 0] = 1.0  # BOS
    source_changed: list[int] = []
    target_changed: list[int] = []
    changed_src_words: list[str] = []
    changed_tgt_words: list[str] = []
    for si, ti in pairs:
        if ti is None:
            assert si is not None
            source_changed += [p for p in range(*src_spans[si]) if p < length]
            changed_src_words.append(src_words[si])
            continue
        t0, t1 = tgt_spans[ti]
        t_positions = [p for p in range(t0, t1) if p < length - 1]
        if si is None or (mode == "refine" and src_words[si] != tgt_words[ti]):
            # A word with no source counterpart attends with its own map.
            for p in t_positions:
                own[p] = 1.0
            target_changed += t_positions
            changed_tgt_words.append(tgt_words[ti])
            if si is not None:
                source_changed += [p for p in range(*src_spans[si]) if p < length]
                changed_src_words.append(src_words[si])
            continue
        s0, s1 = src_spans[si]
        s_positions = [p for p in range(s0, s1) if p < length - 1]
        if src_words[si] == tgt_words[ti] and len(s_positions) == len(t_positions):
            for s, t in zip(s_positions, t_positions):
                matrix[s, t] = 1.0
        else:  # a swapped word: each target token takes the mean of the source word's tokens
            for t in t_positions:
                for s in s_positions:
                    matrix[s, t] = 1.0 / max(1, len(s_positions))
            source_changed += s_positions
            target_changed += t_positions
            changed_src_words.append(src_words[si])
            changed_tgt_words.append(tgt_words[ti])
    # EOS and padding: aligned from the end of each prompt.
    src_end = src_spans[-1][1] if src_spans else 1
    tgt_end = tgt_spans[-1][1] if tgt_spans else 1
    for t in range(min(tgt_end, length - 1), length):
        s = min(length - 1, src_end + (t - tgt_end))
        matrix[s, t] = 1.0
    weighted: list[int] = []
    for word_index, weight in weights.items():
        for p in range(*tgt_spans[word_index]):
            if p < length:
                matrix[:, p] *= weight
                own[p] *= weight
                weighted.append(p)

    identity = torch.equal(matrix, torch.eye(length))
    has_own = bool(own.any())
    if not source_changed and not target_changed and not weights and identity and not has_own:
        kind = "identity"
    elif not source_changed and not target_changed:
        kind = "reweight"
    else:
        kind = mode
    return TokenEdit(
        kind=kind,
        source_prompt=source_clean,
        target_prompt=target,
        matrix=None if identity else matrix,
        own=own if has_own else None,
        source_changed=sorted(set(source_changed)),
        target_changed=sorted(set(target_changed)),
        changed_words=(changed_src_words, changed_tgt_words),
        weighted=sorted(set(weighted)),
    )
