"""Scene graphs of the embedded world and their anti-aliased renderer.

A scene is one to three objects (shape, color, size, position on a 3x3 grid) on a plain
background. `render` draws it at 4x the output resolution and box-downsamples, so edges are
anti-aliased; without an rng it is fully deterministic, with one it adds a small jitter of
position and size (used to make training data less regular).

A *partial* scene is what a prompt names: every object has its shape, but its color, size and
position, and the background, may be None ("a circle", "a red star in the top left"). A scene
with no objects and a background is a plain backdrop ("a blue background"). `complete` draws
the unnamed attributes at random; only complete scenes render.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLORS, POSITIONS, SHAPES, SIZES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 165, 60),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 35),
    "purple": (135, 45, 180),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (250, 150, 205),
    "cyan": (40, 215, 225),
}

# Object diameter as a fraction of the image width.
SIZE_FRACTION = {"small": 0.2, "large": 0.4}

# Centre of each grid cell, as fractions of width / height (x, y); y grows downwards.
_GRID = (0.22, 0.5, 0.78)
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (_GRID[0], _GRID[1]),
    "right": (_GRID[2], _GRID[1]),
    "top": (_GRID[1], _GRID[0]),
    "bottom": (_GRID[1], _GRID[2]),
    "center": (_GRID[1], _GRID[1]),
    "top left": (_GRID[0], _GRID[0]),
    "top right": (_GRID[2], _GRID[0]),
    "bottom left": (_GRID[0], _GRID[2]),
    "bottom right": (_GRID[2], _GRID[2]),
}

SUPERSAMPLE = 4


OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str | None = None  # None: the prompt does not say
    size: str | None = None
    position: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        return cls(shape=d["shape"], color=d.get("color"), size=d.get("size"), position=d.get("position"))

    @property
    def is_complete(self) -> bool:
        return None not in (self.color, self.size, self.position)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str | None = None  # None: the prompt does not say

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(objects=tuple(SceneObject.from_dict(o) for o in d["objects"]), background=d.get("background"))

    def canonical(self) -> Scene:
        """The same scene with objects in grid order (the order `random_scene` produces)."""
        return Scene(objects=canonical_objects(self.objects), background=self.background)

    @property
    def is_complete(self) -> bool:
        """Every attribute named: the scene can be rendered as it stands."""
        return self.background is not None and all(o.is_complete for o in self.objects)

    def named_attributes(self) -> int:
        """How many attributes the scene names (shapes included), the background counted once."""
        named = sum(getattr(o, a) is not None for o in self.objects for a in OBJECT_ATTRIBUTES)
        return named + (self.background is not None)


def canonical_objects(objects) -> tuple[SceneObject, ...]:
    def key(o: SceneObject):
        position = POSITIONS.index(o.position) if o.position in POSITIONS else 99
        return (position, o.shape, o.color or "", o.size or "")

    return tuple(sorted(objects, key=key))


def complete(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with every unnamed attribute drawn at random (named ones are kept).

    Draws as `random_scene` does: positions distinct, no object colored like the background.
    A backdrop-only scene stays without objects.
    """
    named_colors = {o.color for o in scene.objects if o.color is not None}
    background = scene.background
    if background is None:
        choices = [c for c in COLORS if c not in named_colors] or list(COLORS)
        background = choices[rng.integers(len(choices))]
    free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
    objects = []
    for obj in scene.objects:
        position = obj.position
        if position is None:
            position = free.pop(int(rng.integers(len(free))))
        colors = [c for c in COLORS if c != background]
        color = obj.color if obj.color is not None else colors[rng.integers(len(colors))]
        size = obj.size if obj.size is not None else SIZES[rng.integers(len(SIZES))]
        objects.append(SceneObject(obj.shape, color, size, position))
    return Scene(objects=canonical_objects(objects), background=background)


def scene_key(scene: Scene) -> str:
    """A stable text key of the scene's content (object order ignored)."""
    return json.dumps(scene.canonical().to_dict(), sort_keys=True)


def scene_bucket(scene: Scene) -> int:
    """Stable bucket 0..99 of a scene's content; the splits partition the buckets."""
    return int(hashlib.sha256(scene_key(scene).encode()).hexdigest()[:8], 16) % 100


def scene_split(scene: Scene) -> str:
    """Which split a scene's content belongs to: "train" (80%), "validation" (10%), "test" (10%).

    Splitting by content, not only by seed, guarantees no test scene is ever trained on.
    """
    b = scene_bucket(scene)
    return "train" if b < 80 else ("validation" if b < 90 else "test")


def random_object(rng: np.random.Generator, position: str, background: str) -> SceneObject:
    colors = [c for c in COLORS if c != background]
    return SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=colors[rng.integers(len(colors))],
        size=SIZES[rng.integers(len(SIZES))],
        position=position,
    )


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 1-3 objects at distinct positions, none colored like the background."""
    if n_objects is None:
        n_objects = int(rng.integers(1, 4))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be 1..3, got {n_objects}")
    background = COLORS[rng.integers(len(COLORS))]
    positions = rng.choice(len(POSITIONS), size=n_objects, replace=False)
    objects = [random_object(rng, POSITIONS[int(p)], background) for p in positions]
    return Scene(objects=canonical_objects(objects), background=background)


# ---------------------------------------------------------------- shape outlines


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(n: int = 96) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [((x - cx) / half, (y - cy) / half) for x, y in pts]


_CROSS_W = 0.34
_CROSS = [
    (-_CROSS_W, -1), (_CROSS_W, -1), (_CROSS_W, -_CROSS_W), (1, -_CROSS_W), (1, _CROSS_W),
    (_CROSS_W, _CROSS_W), (_CROSS_W, 1), (-_CROSS_W, 1), (-_CROSS_W, _CROSS_W), (-1, _CROSS_W),
    (-1, -_CROSS_W), (-_CROSS_W, -_CROSS_W),
]
_TRIANGLE = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
_SQUARE_HALF = 0.86  # a square of the same nominal size looks as large as the circle
_OUTLINES = {"star": _star(), "heart": _heart(), "cross": _CROSS, "triangle": _TRIANGLE}


def _draw_mask(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = r * 0.55
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "square":
        h = r * _SQUARE_HALF
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape in _OUTLINES:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _OUTLINES[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=4096)
def _render_cached(scene: Scene, size: int) -> bytes:
    return _render(scene, size, None).tobytes()


def _render(scene: Scene, size: int, rng: np.random.Generator | None) -> np.ndarray:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), RGB[scene.background])
    for obj in scene.objects:
        fx, fy = POSITION_XY[obj.position]
        frac = SIZE_FRACTION[obj.size]
        if rng is not None:
            fx += rng.uniform(-0.035, 0.035)
            fy += rng.uniform(-0.035, 0.035)
            frac *= rng.uniform(0.9, 1.1)
        mask = Image.new("L", (big, big), 0)
        _draw_mask(ImageDraw.Draw(mask), obj.shape, fx * big, fy * big, frac * big / 2)
        img.paste(RGB[obj.color], (0, 0, big, big), mask)
    small = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render `scene` as a uint8 (size, size, 3) array.

    Deterministic when `rng` is None; with an rng, positions move by up to 3.5% of the width
    and sizes by up to 10%. A partial scene must be `complete`d first.
    """
    if not scene.is_complete:
        raise ValueError(f"cannot render a partial scene (complete it first): {scene}")
    if rng is None:
        return np.frombuffer(_render_cached(scene, size), dtype=np.uint8).reshape(size, size, 3).copy()
    return _render(scene, size, rng)
