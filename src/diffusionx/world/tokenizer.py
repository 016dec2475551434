"""A small byte-level BPE tokenizer in CLIP's exact file format.

`build_tokenizer(folder)` writes vocab.json / merges.txt / tokenizer_config.json so that
`CLIPTokenizer.from_pretrained(folder)` loads it, like any Stable Diffusion tokenizer.
Merges are learned (classic BPE) on the world's words, so each of them is one token;
any other text falls back to smaller pieces, down to single bytes.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from .vocab import COLORS, FUNCTION_WORDS, POSITIONS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # Same table as GPT-2 / CLIP: printable bytes map to themselves, the rest above 255.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def world_words() -> list[str]:
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(FUNCTION_WORDS)
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al.) until every word is a single symbol."""
    corpus = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in corpus.values():
            pairs.update(itertools.pairwise(symbols))
        if not pairs:
            return merges
        # Most frequent pair; ties broken alphabetically so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in corpus.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            corpus[word] = merged


def build_tokenizer(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges = learn_merges(world_words())
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder
