"""Multi-round prompt sessions of the embedded world.

A session is 3-8 rounds of prompts that evolve as people edit prompts. Each round records the
prompt, its scene graph and the edit that produced it from the previous round:

- ``start``: the first round.
- ``add_detail``: a small object is added (the prompt grows by one phrase).
- ``change_attribute``: one object's shape, color, size or position changes (one word or phrase).
- ``add_object``: a large object is added.
- ``remove_object``: one object is dropped (only when there are two or more).
- ``change_background``: the background color changes.
- ``reword``: the same scene, described with a new paraphrase.
- ``start_over``: a new random scene and a new wording.

Edit frequencies follow the prompt statistics of DiffusionDB (shared/data/README.md): about
40% of real prompts are near-copies of a recent one and about 50% are new ideas. A new idea is
a new session here; inside a session most edits are small and keep the wording (the caption
style is kept, so only the edited words change), with occasional rewording and start-overs.

Splits are fixed by seed *and* by scene content (`scene_split`): every scene of a split's
sessions lies in that split's share of the scene space, so no test scene is ever trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .captions import caption_with_style, sample_style
from .scene import Scene, SceneObject, canonical_objects, random_object, random_scene, scene_split
from .vocab import COLORS, POSITIONS, SHAPES, SIZES

SPLIT_SEEDS = {"train": 1_000_003, "validation": 2_000_003, "test": 3_000_017}

EDITS = (
    "start", "add_detail", "change_attribute", "add_object", "remove_object",
    "change_background", "reword", "start_over",
)
# Probabilities of the edits after the first round (small edits dominate).
EDIT_WEIGHTS = {
    "add_detail": 0.17,
    "change_attribute": 0.33,
    "add_object": 0.10,
    "remove_object": 0.10,
    "change_background": 0.12,
    "reword": 0.10,
    "start_over": 0.08,
}
_MAX_TRIES = 200


def _free_positions(scene: Scene) -> list[str]:
    used = {o.position for o in scene.objects}
    return [p for p in POSITIONS if p not in used]


def _with_objects(scene: Scene, objects) -> Scene:
    return Scene(objects=canonical_objects(objects), background=scene.background)


def _apply_edit(scene: Scene, edit: str, rng: np.random.Generator) -> Scene | None:
    """The edited scene, or None when the edit does not apply to this scene."""
    objs = list(scene.objects)
    if edit in ("add_detail", "add_object"):
        if len(objs) >= 3:
            return None
        pos = _free_positions(scene)
        new = random_object(rng, pos[rng.integers(len(pos))], scene.background)
        size = "small" if edit == "add_detail" else "large"
        return _with_objects(scene, [*objs, SceneObject(new.shape, new.color, size, new.position)])
    if edit == "remove_object":
        if len(objs) < 2:
            return None
        del objs[rng.integers(len(objs))]
        return _with_objects(scene, objs)
    if edit == "change_attribute":
        k = int(rng.integers(len(objs)))
        o = objs[k]
        attr = ("shape", "color", "size", "position")[rng.integers(4)]
        if attr == "shape":
            o = SceneObject(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.size, o.position)
        elif attr == "color":
            choices = [c for c in COLORS if c not in (o.color, scene.background)]
            o = SceneObject(o.shape, str(rng.choice(choices)), o.size, o.position)
        elif attr == "size":
            o = SceneObject(o.shape, o.color, SIZES[1 - SIZES.index(o.size)], o.position)
        else:
            pos = _free_positions(scene)
            o = SceneObject(o.shape, o.color, o.size, str(rng.choice(pos)))
        objs[k] = o
        return _with_objects(scene, objs)
    if edit == "change_background":
        used = {o.color for o in objs} | {scene.background}
        choices = [c for c in COLORS if c not in used]
        return Scene(objects=scene.objects, background=str(rng.choice(choices)))
    if edit in ("reword", "start_over"):
        return scene if edit == "reword" else random_scene(rng)
    raise ValueError(f"unknown edit {edit!r}")


def _scene_in_split(rng: np.random.Generator, split: str) -> Scene:
    for _ in range(_MAX_TRIES * 10):
        scene = random_scene(rng)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError("no scene found in split")  # pragma: no cover


def _session(rng: np.random.Generator, split: str, index: int) -> dict:
    n_rounds = int(rng.integers(3, 9))
    scene = _scene_in_split(rng, split)
    style = sample_style(rng)
    rounds = [{"prompt": caption_with_style(scene, style), "scene": scene.to_dict(), "edit": "start"}]
    names = list(EDIT_WEIGHTS)
    probs = np.array([EDIT_WEIGHTS[e] for e in names])
    probs = probs / probs.sum()
    while len(rounds) < n_rounds:
        edit = names[rng.choice(len(names), p=probs)]
        if edit == "start_over":
            new_scene = _scene_in_split(rng, split)
        else:
            new_scene = None
            for _ in range(_MAX_TRIES):
                candidate = _apply_edit(scene, edit, rng)
                if candidate is None:
                    break
                if scene_split(candidate) == split:
                    new_scene = candidate
                    break
            if new_scene is None:
                continue  # the edit does not apply here; draw another
        if edit in ("reword", "start_over"):
            new_style = sample_style(rng)
            prompt = caption_with_style(new_scene, new_style)
            if edit == "reword" and prompt == rounds[-1]["prompt"]:
                continue
            style = new_style
        else:
            prompt = caption_with_style(new_scene, style)
        scene = new_scene
        rounds.append({"prompt": prompt, "scene": scene.to_dict(), "edit": edit})
    return {"id": f"{split}-{index:05d}", "split": split, "rounds": rounds}


def generate_sessions(n: int, split: str) -> list[dict]:
    """`n` sessions of `split` ("train", "validation" or "test"), the same on every call.

    Each session: {"id", "split", "rounds": [{"prompt", "scene", "edit"}, ...]} with 3-8 rounds;
    the last round's prompt is the session's final prompt.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    return [_session(rng, split, i) for i in range(n)]


def write_jsonl(sessions: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in sessions)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
