"""The embedded world's caption grammar and its inverse.

`caption(scene, rng)` describes a scene with paraphrases and varied word order, e.g.
"a large red circle on the left on a blue background" or
"blue background, big red circle at the left". Every word choice is drawn from a *style*
(`sample_style`); `caption_with_style` renders a scene with a given style, so that a small
edit of the scene re-uses the wording and only the edited words change, as when a person
edits a prompt.

Prompts may be partial, as people write them: an object needs its shape word, its size, color
and position may be left unsaid, and so may the background ("a circle", "heart, black
background", "a red star in the top left"); a background alone is a prompt too ("a blue
background"). `caption_with_style` words a partial scene (attributes that are None are left
out) and `partial_caption` draws which attributes a training caption names.

`parse_prompt(text)` inverts every form the grammar produces, partial ones included, into the
(partial) scene the text names; it returns None for text that is not a world prompt (unknown
words, a color or size without a shape, two backgrounds). It also reads a few forms people
write that the grammar never produces: counts ("two red circles": alike objects, no position),
a bare background color ("a red star on white", "background blue") and "top center" /
"middle left" for the edge cells. `unknown_words` lists what falls outside the vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .scene import Scene, SceneObject, canonical_objects
from .vocab import COLORS, FUNCTION_WORDS, POSITIONS, SHAPES, SIZES

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
# Objects without a background phrase, and a background without objects.
NO_BACKGROUND = ("{objs}",)
BACKGROUND_ONLY = ("a {bg} background", "{bg} background", "a plain {bg} backdrop", "a plain {bg} background")
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
    size = ""
    if obj.size is not None:
        size_words = SIZE_WORDS[obj.size]
        size = size_words[style.size_word[slot % 3] % len(size_words)]
    obj_text = " ".join(w for w in (size, obj.color or "", obj.shape) if w)
    obj_text = style.article + obj_text
    if obj.position is None:
        return obj_text
    phrases = POSITION_PHRASES[obj.position]
    pos = phrases[style.position_phrase[slot % 3] % len(phrases)]
    return style.object_form.format(obj=obj_text, pos=pos)


def caption_with_style(scene: Scene, style: CaptionStyle) -> str:
    """`scene` worded with `style`; attributes that are None are not said."""
    if any(o.position is None for o in scene.objects) and style.object_form != OBJECT_FORMS[0]:
        # "a circle and on the right, a square" would give the circle the position: positions
        # go after their objects when not every object has one
        style = replace(style, object_form=OBJECT_FORMS[0])
    parts = [_object_phrase(o, i, style) for i, o in enumerate(scene.objects)]
    if len(parts) <= 1:
        objs = "".join(parts)  # "" for a backdrop alone
    elif len(style.joiner) == 1:
        objs = style.joiner[0].join(parts)
    else:
        objs = style.joiner[0].join(parts[:-1]) + style.joiner[1] + parts[-1]
    if not parts:
        if scene.background is None:
            raise ValueError("a scene with no objects needs a background to be worded")
        template = BACKGROUND_ONLY[(style.size_word[0] + style.position_phrase[0]) % len(BACKGROUND_ONLY)]
        text = template.format(bg=scene.background)
    elif scene.background is None:
        text = style.prefix + objs
    else:
        prefix = style.prefix if style.template in BACKGROUND_LAST else ""
        text = prefix + style.template.format(objs=objs, bg=scene.background)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random paraphrase describing `scene` completely (every attribute of every object)."""
    return caption_with_style(scene, sample_style(rng))


# Training captions: about half name everything; the rest leave each attribute out at random.
COMPLETE_SHARE = 0.5
DROP_PROBABILITY = {"size": 0.5, "color": 0.35, "position": 0.45, "background": 0.45}


def named_part(scene: Scene, rng: np.random.Generator, complete_share: float = COMPLETE_SHARE) -> Scene:
    """The part of a complete `scene` that a caption names: everything with probability
    `complete_share`, else each object's size, color and position and the background are
    left out at random (shapes are always named, every object is named)."""
    if rng.random() < complete_share:
        return scene
    objects = tuple(
        SceneObject(
            o.shape,
            None if rng.random() < DROP_PROBABILITY["color"] else o.color,
            None if rng.random() < DROP_PROBABILITY["size"] else o.size,
            None if rng.random() < DROP_PROBABILITY["position"] else o.position,
        )
        for o in scene.objects
    )
    background = None if rng.random() < DROP_PROBABILITY["background"] else scene.background
    return Scene(objects=objects, background=background)


def partial_caption(scene: Scene, rng: np.random.Generator, complete_share: float = COMPLETE_SHARE) -> str:
    """A training caption of the complete `scene` that may leave attributes unsaid."""
    return caption_with_style(named_part(scene, rng, complete_share), sample_style(rng))


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
_BACKGROUND_LINKS = {"is", "of", "in"}  # "the background is blue", "a background of blue"
_COUNTS = {"two": 2, "three": 3}  # "two red circles"
PLURAL_SHAPES = {f"{s}es" if s.endswith("s") else f"{s}s": s for s in SHAPES}
ALLOWED_WORDS = (
    set(FUNCTION_WORDS) | set(SHAPES) | set(COLORS) | set(SIZE_OF_WORD) | set(_VERT) | set(_HORIZ)
    | _CENTER | _BACKGROUND | {"left", "right", "top", "bottom", "center"}
)
VOCABULARY_WORDS = frozenset(ALLOWED_WORDS)


def prompt_words(text: str) -> list[str]:
    """Lower-case words of a prompt; hyphens and apostrophes split words ("top-left")."""
    return re.findall(r"[a-z]+", text.lower())


def unknown_words(text: str) -> list[str]:
    """Words of `text` outside the embedded world's vocabulary, in order, each once."""
    seen: dict[str, None] = {}
    for word in re.findall(r"[^\W\d_]+|\d+", text.lower()):
        if word not in VOCABULARY_WORDS:
            seen.setdefault(word)
    return list(seen)


def _tokens(words: list[str]) -> list[tuple[str, object]] | None:
    """The prompt as a list of ("obj", (size, color, shape)), ("pos", p) and ("bg", color)."""
    items: list[tuple[str, object]] = []
    i, n = 0, len(words)
    while i < n:
        w = words[i]
        if w in _COUNTS:  # "two circles", "three small red stars": that many alike objects
            size = color = None
            k = i + 1
            while k < n and (words[k] in COLORS or words[k] in SIZE_OF_WORD):
                if (words[k] in COLORS and color is not None) or (words[k] in SIZE_OF_WORD and size is not None):
                    return None
                color, size = (words[k], size) if words[k] in COLORS else (color, SIZE_OF_WORD[words[k]])
                k += 1
            if k < n and words[k] in PLURAL_SHAPES:
                items.append(("objs", (_COUNTS[w], size, color, PLURAL_SHAPES[words[k]])))
                i = k + 1
                continue
            return None
        if w in PLURAL_SHAPES:
            return None  # "circles" without a count: how many is not said
        if w in COLORS or w in SIZE_OF_WORD:
            # adjectives then a shape, in either order: "large red circle", "red big star"
            size = color = None
            k = i
            while k < n and (words[k] in COLORS or words[k] in SIZE_OF_WORD):
                if words[k] in COLORS:
                    if color is not None:
                        break
                    color = words[k]
                else:
                    if size is not None:
                        return None
                    size = SIZE_OF_WORD[words[k]]
                k += 1
            if k < n and words[k] in SHAPES:
                items.append(("obj", (size, color, words[k])))
                i = k + 1
                continue
            if w in COLORS and size is None:
                j = i + 1
                while j < n and words[j] in _COLOR_FILLERS:
                    j += 1
                if j < n and words[j] in _BACKGROUND:
                    items.append(("bg", w))
                    i = j + 1
                    continue
                if k == i + 1 and i > 0 and words[i - 1] in ("on", "over"):  # "a red star on white"
                    items.append(("bg", w))
                    i += 1
                    continue
            return None  # a color or size that is neither an object's nor the background's
        if w in SHAPES:
            items.append(("obj", (None, None, w)))
            i += 1
            continue
        if w in _VERT:
            if i + 1 < n and words[i + 1] in _HORIZ:
                items.append(("pos", f"{_VERT[w]} {_HORIZ[words[i + 1]]}"))
                i += 2
            else:  # "top", "top center" (the middle column's top cell)
                items.append(("pos", _VERT[w]))
                i += 2 if i + 1 < n and words[i + 1] in _CENTER else 1
            continue
        if w in _HORIZ:
            items.append(("pos", _HORIZ[w]))
            i += 1
            continue
        if w in _CENTER:
            if i + 1 < n and words[i + 1] in _HORIZ:  # "middle left" (the middle row's left cell)
                items.append(("pos", _HORIZ[words[i + 1]]))
                i += 2
            else:
                items.append(("pos", "center"))
                i += 1
            continue
        if w in _BACKGROUND:
            j = i + 1
            while j < n and words[j] in _BACKGROUND_LINKS | _COLOR_FILLERS | {"a", "the"}:
                j += 1
            if j < n and words[j] in COLORS and not (j + 1 < n and words[j + 1] in SHAPES):
                items.append(("bg", words[j]))
                i = j + 1
                continue
            return None  # "background" without a color
        i += 1
    return items


def _attach_positions(items: list[tuple[str, object]]) -> list[SceneObject] | None:
    """Give each position phrase to its object: the one before it ("a circle on the left"), or,
    when the prompt opens with a position, the one after it ("on the left, a circle")."""
    rest = [(k, v) for k, v in items if k != "bg"]
    position_first = bool(rest) and rest[0][0] == "pos"
    objects: list[list] = []  # [size, color, shape, position]
    pending: str | None = None
    group = False  # the last object phrase named several objects ("two circles")
    for kind, value in rest:
        if kind == "obj":
            size, color, shape = value  # type: ignore[misc]
            objects.append([size, color, shape, pending])
            pending, group = None, False
        elif kind == "objs":
            count, size, color, shape = value  # type: ignore[misc]
            if pending is not None:
                return None  # one position for several objects
            objects.extend([size, color, shape, None] for _ in range(count))
            group = True
        elif position_first:
            if pending is not None:
                return None  # two positions in a row
            pending = str(value)
        else:
            if not objects or objects[-1][3] is not None or group:
                return None  # a position with no object of its own, or one for several objects
            objects[-1][3] = str(value)
    if pending is not None:
        return None  # a position after the last object
    return [SceneObject(shape=shape, color=color, size=size, position=pos) for size, color, shape, pos in objects]


def parse_prompt(text: str) -> Scene | None:
    """The (partial) scene a world prompt names, or None when `text` is not a world prompt.

    Accepts every form `caption` and `partial_caption` produce (any order of objects and
    background phrase, any paraphrase, attributes left out). Unnamed attributes are None.
    Objects come back in canonical (grid) order.
    """
    if not isinstance(text, str):
        return None
    if re.search(r"[^a-zA-Z\s,.;:!'\-]", text):
        return None
    words = prompt_words(text)
    if not words or any(w not in ALLOWED_WORDS for w in words):
        return None
    items = _tokens(words)
    if items is None:
        return None
    backgrounds = [v for k, v in items if k == "bg"]
    objects = _attach_positions(items)
    if objects is None or len(backgrounds) > 1 or (not objects and not backgrounds):
        return None
    positions = [o.position for o in objects if o.position is not None]
    if len(objects) > 3 or len(set(positions)) != len(positions):
        return None
    assert all(p in POSITIONS for p in positions) and all(o.size in (None, *SIZES) for o in objects)
    return Scene(objects=canonical_objects(objects), background=str(backgrounds[0]) if backgrounds else None)
