"""The embedded synthetic world: scenes, renderer, caption grammar, multi-round sessions."""

from .captions import canonical_caption, caption, caption_with_style, parse_prompt, sample_style
from .scene import Scene, SceneObject, random_scene, render, scene_split
from .sessions import EDITS, SPLIT_SEEDS, generate_sessions, read_jsonl, write_jsonl
from .vocab import COLORS, POSITIONS, SHAPES, SIZES

__all__ = [
    "COLORS", "EDITS", "POSITIONS", "SHAPES", "SIZES", "SPLIT_SEEDS", "Scene", "SceneObject",
    "canonical_caption", "caption", "caption_with_style", "generate_sessions", "parse_prompt",
    "random_scene", "read_jsonl", "render", "sample_style", "scene_split", "write_jsonl",
]
