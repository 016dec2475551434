"""The embedded world's caption grammar and its inverse.

`caption(scene, rng)` describes a scene with paraphrases and varied word order, e.g.
"a large red circle on the left on a blue background" or
"blue background, big red circle at the left". Every word choice is drawn from a *style*
(`sample_style`); `caption_with_style` renders a scene with a given style, so that a small
edit of the scene re-uses the wording and only the edited words change, as when a person
edits a prompt.

`parse_prompt(text)` inverts every form the grammar produces; it returns None for text that
is not a world prompt (unknown words, missing or stray attributes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .scene import Scene, SceneObject, canonical_objects
from .vocab import COLORS, FUNCTION_WORDS, POSITIONS, SHAPES

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
SIZE_OF_WORD = {w: size for size, words in SIZE_WORDS.items() for w in words}

# Position phrases; "{}"-free strings. Parsing only looks at the position words in them.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side", "to the left", "near the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right", "near the right"),
    "top": ("at the top", "near the top", "on the upper side", "at the top side"),
    "bottom": ("at the bottom", "near the bottom", "on the lower side", "at the bottom side"),
    "center": ("in the center", "in the middle", "at the centre", "in the centre"),
}
for _v, _vw in (("top", ("top", "upper")), ("bottom", ("bottom", "lower"))):
    for _h in ("left", "right"):
        POSITION_PHRASES[f"{_v} {_h}"] = tuple(
            p for w in _vw for p in (f"in the {w} {_h}", f"in the {w} {_h} corner", f"at the {w} {_h}")
        )

OBJECT_FORMS = ("{obj} {pos}", "{pos} there is {obj}", "{pos}, {obj}")
ARTICLES = ("a ", "one ", "")
BACKGROUND_LAST = (
    "{objs} on a {bg} background",
    "{objs} on a plain {bg} background",
    "{objs}, {bg} background",
    "{objs} with a {bg} background",
    "{objs} over a {bg} backdrop",
    "{objs} on a {bg} colored background",
)
BACKGROUND_FIRST = (
    "{bg} background, {objs}",
    "on a {bg} background, {objs}",
    "a plain {bg} backdrop with {objs}",
    "{bg} background with {objs}",
)
PREFIXES = ("", "", "", "an image of ", "a picture of ", "a scene with ", "a picture showing ")
JOINERS = ((" and ",), (", ", " and "), (" with ",), (", ",))


@dataclass(frozen=True)
class CaptionStyle:
    """Every wording choice of a caption; objects use their slot (mod 3) of the per-object lists."""

    template: str
    prefix: str
    object_form: str
    joiner: tuple[str, ...]
    article: str
    size_word: tuple[int, int, int]
    position_phrase: tuple[int, int, int]


def sample_style(rng: np.random.Generator) -> CaptionStyle:
    templates = BACKGROUND_LAST + BACKGROUND_FIRST
    template = templates[rng.integers(len(templates))]
    object_form = OBJECT_FORMS[0] if rng.random() < 0.6 else OBJECT_FORMS[rng.integers(1, 3)]
    if object_form != OBJECT_FORMS[0] and "with {objs}" in template:
        object_form = OBJECT_FORMS[0]  # "... backdrop with at the top, a ..." reads badly
    joiners = JOINERS if object_form == OBJECT_FORMS[0] else JOINERS[:2]
    return CaptionStyle(
        template=template,
        # A prefix before a leading background phrase reads badly; only objects-first gets one.
        prefix=PREFIXES[rng.integers(len(PREFIXES))] if template in BACKGROUND_LAST else "",
        object_form=object_form,
        joiner=joiners[rng.integers(len(joiners))],
        article=ARTICLES[0] if rng.random() < 0.6 else ARTICLES[rng.integers(1, 3)],
        size_word=tuple(int(x) for x in rng.integers(0, 3, size=3)),
        position_phrase=tuple(int(x) for x in rng.integers(0, 12, size=3)),
    )


def _object_phrase(obj: SceneObject, slot: int, style: CaptionStyle) -> str:
    size_words = SIZE_WORDS[obj.size]
    size = size_words[style.size_word[slot % 3] % len(size_words)]
    phrases = POSITION_PHRASES[obj.position]
    pos = phrases[style.position_phrase[slot % 3] % len(phrases)]
    obj_text = f"{style.article}{size} {obj.color} {obj.shape}"
    return style.object_form.format(obj=obj_text, pos=pos)


def caption_with_style(scene: Scene, style: CaptionStyle) -> str:
    parts = [_object_phrase(o, i, style) for i, o in enumerate(scene.objects)]
    if len(parts) == 1:
        objs = parts[0]
    elif len(style.joiner) == 1:
        objs = style.joiner[0].join(parts)
    else:
        objs = style.joiner[0].join(parts[:-1]) + style.joiner[1] + parts[-1]
    text = style.prefix + style.template.format(objs=objs, bg=scene.background)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random paraphrase describing `scene` completely (every attribute of every object)."""
    return caption_with_style(scene, sample_style(rng))


def canonical_caption(scene: Scene) -> str:
    """The plainest form: "a large red circle on the left and ... on a blue background"."""
    style = CaptionStyle(BACKGROUND_LAST[0], "", OBJECT_FORMS[0], JOINERS[0], "a ", (0, 0, 0), (0, 0, 0))
    return caption_with_style(scene, style)


# ---------------------------------------------------------------- parsing

_VERT = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZ = {"left": "left", "right": "right"}
_CENTER = {"center", "centre", "middle"}
_BACKGROUND = {"background", "backdrop"}
_COLOR_FILLERS = {"colored", "coloured", "plain"}
ALLOWED_WORDS = (
    set(FUNCTION_WORDS) | set(SHAPES) | set(COLORS) | set(SIZE_OF_WORD) | set(_VERT) | set(_HORIZ)
    | _CENTER | _BACKGROUND | {"left", "right", "top", "bottom", "center"}
)


def parse_prompt(text: str) -> Scene | None:
    """The scene a world prompt describes, or None when `text` is not a world prompt.

    Accepts every form `caption` produces (any order of objects and background phrase, any
    paraphrase). Objects come back in canonical (grid) order.
    """
    if not isinstance(text, str):
        return None
    if re.search(r"[^a-zA-Z\s,.;]", text):
        return None
    words = re.findall(r"[a-z]+", text.lower())
    if not words or any(w not in ALLOWED_WORDS for w in words):
        return None
    items: list[tuple[str, object]] = []
    i, n = 0, len(words)
    while i < n:
        w = words[i]
        if w in COLORS:
            j = i + 1
            while j < n and words[j] in _COLOR_FILLERS:
                j += 1
            if j < n and words[j] in _BACKGROUND:
                items.append(("bg", w))
                i = j + 1
                continue
            return None  # a color that is neither an object's nor the background's
        if w in SIZE_OF_WORD:
            if i + 2 < n and words[i + 1] in COLORS and words[i + 2] in SHAPES:
                items.append(("obj", (SIZE_OF_WORD[w], words[i + 1], words[i + 2])))
                i += 3
                continue
            return None
        if w in SHAPES:
            return None  # a shape without size and color
        if w in _VERT:
            if i + 1 < n and words[i + 1] in _HORIZ:
                items.append(("pos", f"{_VERT[w]} {_HORIZ[words[i + 1]]}"))
                i += 2
            else:
                items.append(("pos", _VERT[w]))
                i += 1
            continue
        if w in _HORIZ:
            items.append(("pos", _HORIZ[w]))
            i += 1
            continue
        if w in _CENTER:
            items.append(("pos", "center"))
            i += 1
            continue
        if w in _BACKGROUND:
            return None  # "background" without a color
        i += 1
    backgrounds = [v for k, v in items if k == "bg"]
    rest = [(k, v) for k, v in items if k != "bg"]
    if len(backgrounds) != 1 or not rest or len(rest) % 2:
        return None
    first = rest[0][0]
    second = "pos" if first == "obj" else "obj"
    objects = []
    for a, b in zip(rest[0::2], rest[1::2]):
        if a[0] != first or b[0] != second:
            return None
        (size, color, shape), position = (a[1], b[1]) if first == "obj" else (b[1], a[1])
        objects.append(SceneObject(shape=shape, color=color, size=size, position=position))
    if not 1 <= len(objects) <= 3 or len({o.position for o in objects}) != len(objects):
        return None
    assert all(o.position in POSITIONS for o in objects)
    return Scene(objects=canonical_objects(objects), background=str(backgrounds[0]))
