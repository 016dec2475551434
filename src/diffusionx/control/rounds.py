"""Which kind of round an edit gets: the documented `auto` rule (docs/control.md).

When both prompts are in the embedded world's vocabulary, the edit's kind (add or drop a detail,
change an attribute or the background, add or remove an object, reword) picks the mode
`diffusionx bench-edits --write-auto-modes` measured to pay for that kind on the shipped pair
(`assets/control/auto_modes.json`); otherwise, and for kinds it did not measure, the word rule
below decides.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .prompts import align_words, parse_weights, split_words

if TYPE_CHECKING:
    from ..world.scene import Scene

AUTO_MODES_PATH = Path(__file__).resolve().parent.parent / "assets" / "control" / "auto_modes.json"

MODES = ("fresh", "sdedit", "controlled", "local", "auto")
# Words that move things: a layout edit that attention injection would fight.
LAYOUT_WORDS = frozenset(
    {"left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "side", "corner"}
)


def changed_objects(prev: Scene, new: Scene) -> tuple[list, list]:
    """(objects the edit removed, objects it added): a changed object is in both lists."""
    gone = [o for o in prev.objects if o not in new.objects]
    came = [o for o in new.objects if o not in prev.objects]
    return gone, came


def infer_kind(prev: Scene, new: Scene) -> str | None:
    """The edit kind of an unlabelled pair of scenes (plain-string sessions)."""
    gone, came = changed_objects(prev, new)
    if prev.background != new.background:
        return "change_background" if not gone and not came else None
    if not gone and not came:
        return "reword"
    if not gone:
        return "add_object"
    if not came:
        return "remove_object"
    if len(gone) == len(came) == 1:
        a, b = gone[0], came[0]
        named = [f for f in ("color", "size", "position") if (getattr(a, f) is None) != (getattr(b, f) is None)]
        if a.shape == b.shape and named:
            return "add_detail" if getattr(b, named[0]) is not None else "drop_detail"
        return "change_attribute"
    return None


@lru_cache(maxsize=4)
def measured_modes(path: str | None = None) -> dict[str, Any]:
    """The per-kind modes bench-edits measured ({} when there is no table)."""
    file = Path(path) if path else AUTO_MODES_PATH
    try:
        return json.loads(file.read_text()).get("by_kind", {})
    except (OSError, ValueError):
        return {}


def edit_kind(previous_prompt: str, prompt: str) -> str | None:
    """The edit kind between two prompts of the embedded world (None outside its vocabulary)."""
    from ..world.captions import parse_prompt

    try:
        before, after = parse_prompt(parse_weights(previous_prompt)[0]), parse_prompt(parse_weights(prompt)[0])
    except Exception:
        return None
    if before is None or after is None:
        return None
    return infer_kind(before, after)


def auto_mode(previous_prompt: str, prompt: str, table: dict[str, Any] | None = None) -> tuple[str, str]:
    """(mode, reason) for an edit from `previous_prompt` to `prompt`:

    - same words (perhaps new emphasis) -> controlled (keeps the picture, applies any reweight);
    - an edit of a kind the table measured (both prompts in the world; `table`, default the shipped
      one) -> the mode measured to pay for that kind: a measurement of the pair beats the word
      rules below (on pair5's test edits, read first, they sent 72 of 140 edits to fresh or SDEdit
      and `auto` kept 24.9 dB of the unedited region instead of 27.7, editing less often);
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
    table = measured_modes() if table is None else table
    kind = edit_kind(previous_prompt, prompt) if table else None
    if kind in table:
        chosen = table[kind]
        return chosen["mode"], f"{kind.replace('_', ' ')}: {chosen['method']} measured best for this kind (bench-edits)"
    if max(len(changed_src), len(changed_tgt)) > max(len(source), len(target)) / 2:
        return "fresh", "most words changed: a new idea"
    if LAYOUT_WORDS & (set(changed_src) | set(changed_tgt)):
        return "sdedit", "a position word changed: the layout must move"
    return "controlled", "an appearance edit: keep the composition"
