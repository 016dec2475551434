"""Which kind of round an edit gets: the documented `auto` rule (docs/control.md).

The predictor issue may replace it; it only looks at the words of the two prompts.
"""

from __future__ import annotations

from .prompts import align_words, parse_weights, split_words

MODES = ("fresh", "sdedit", "controlled", "auto")
# Words that move things: a layout edit that attention injection would fight.
LAYOUT_WORDS = frozenset(
    {"left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "side", "corner"}
)


def auto_mode(previous_prompt: str, prompt: str) -> tuple[str, str]:
    """(mode, reason) for an edit from `previous_prompt` to `prompt`:

    - same words (perhaps new emphasis) -> controlled (keeps the picture, applies any reweight);
    - more than half of the words changed -> fresh (a new idea);
    - a position / layout word changed, added or removed -> sdedit (the layout must move);
    - otherwise (words swapped, inserted or removed: an appearance edit) -> controlled.
    """
    source = split_words(parse_weights(previous_prompt)[0])
    target = split_words(parse_weights(prompt)[0])
    pairs = align_words(source, target)
    changed_src = [source[s] for s, t in pairs if s is not None and (t is None or source[s] != target[t])]
    changed_tgt = [target[t] for s, t in pairs if t is not None and (s is None or source[s] != target[t])]
    if not changed_src and not changed_tgt:
        return "controlled", "same words: keep the picture"
    if max(len(changed_src), len(changed_tgt)) > max(len(source), len(target)) / 2:
        return "fresh", "most words changed: a new idea"
    if LAYOUT_WORDS & (set(changed_src) | set(changed_tgt)):
        return "sdedit", "a position word changed: the layout must move"
    return "controlled", "an appearance edit: keep the composition"
