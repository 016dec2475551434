"""Multi-round prompt sessions of the embedded world.

A session is 3-8 rounds of prompts that evolve as people edit prompts. Behind a session is a
complete scene (what the person has in mind); each round's prompt names part of it, as people
write prompts: first prompts are often vague ("a circle") and gain detail. Each round records
the prompt, the (partial) scene it names and the edit that produced it from the previous round:

- ``start``: the first round (often vague: some attributes left unsaid).
- ``add_detail``: one attribute the prompt left unsaid is now named ("a circle" -> "a red circle").
- ``drop_detail``: one named attribute is dropped again ("a red circle" -> "a circle").
- ``change_attribute``: one named attribute of an object changes: shape, color, size or position
  (one word or phrase is replaced).
- ``change_background``: the named background color changes.
- ``add_object``: an object is added (its shape and some of its attributes named).
- ``remove_object``: one object is dropped (only when there are two or more).
- ``reword``: the same named scene, described with a new paraphrase.
- ``start_over``: a new scene, a new wording.

Edit frequencies follow DiffusionDB (shared/data/README.md): of consecutive near-duplicate
prompts, 74% replace words, 18% only add words and 7% only delete words; about half of all
prompts are new ideas (a new session here, or a start-over). Small edits keep the wording (the
caption style is kept, so only the edited words change).

Splits are fixed by seed *and* by scene content (`scene_split` of the complete scene): every
scene of a split's sessions lies in that split's share of the scene space, so no test scene is
ever trained on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .captions import caption_with_style, named_part, parse_prompt, sample_style
from .scene import OBJECT_ATTRIBUTES, Scene, random_object, random_scene, scene_split
from .vocab import COLORS, POSITIONS, SHAPES, SIZES

SPLIT_SEEDS = {"train": 1_000_003, "validation": 2_000_003, "test": 3_000_017}

EDITS = (
    "start", "add_detail", "drop_detail", "change_attribute", "change_background", "add_object",
    "remove_object", "reword", "start_over",
)
# Probabilities of the edits after the first round: replace 0.62, add 0.15, delete 0.06 (the
# DiffusionDB 74 / 18 / 7 mix of near-duplicates), reword 0.09, start over 0.08.
EDIT_WEIGHTS = {
    "change_attribute": 0.50,
    "change_background": 0.12,
    "add_detail": 0.11,
    "add_object": 0.04,
    "drop_detail": 0.04,
    "remove_object": 0.02,
    "reword": 0.09,
    "start_over": 0.08,
}
# A first prompt names everything this often; otherwise attributes are left out.
START_COMPLETE_SHARE = 0.3
_MAX_TRIES = 200


def _free_positions(scene: Scene) -> list[str]:
    used = {o.position for o in scene.objects}
    return [p for p in POSITIONS if p not in used]


def _change_object(full: Scene, named: Scene, rng: np.random.Generator) -> tuple[Scene, Scene]:
    """Replace one named attribute of one object (in the complete scene and in the named part)."""
    k = int(rng.integers(len(named.objects)))
    attrs = [a for a in OBJECT_ATTRIBUTES if getattr(named.objects[k], a) is not None]
    attr = attrs[rng.integers(len(attrs))]
    o = full.objects[k]
    if attr == "shape":
        value = str(rng.choice([s for s in SHAPES if s != o.shape]))
    elif attr == "color":
        value = str(rng.choice([c for c in COLORS if c not in (o.color, full.background)]))
    elif attr == "size":
        value = SIZES[1 - SIZES.index(o.size)]
    else:
        value = str(rng.choice(_free_positions(full)))
    full_objs, named_objs = list(full.objects), list(named.objects)
    full_objs[k] = replace(o, **{attr: value})
    named_objs[k] = replace(named.objects[k], **{attr: value})
    return Scene(tuple(full_objs), full.background), Scene(tuple(named_objs), named.background)


def _unnamed(named: Scene) -> list[tuple[int, str]]:
    """(object index or -1 for the background, attribute) of everything the prompt leaves out."""
    out = [(k, a) for k, o in enumerate(named.objects) for a in OBJECT_ATTRIBUTES if getattr(o, a) is None]
    return out + ([(-1, "background")] if named.background is None else [])


def _named_details(named: Scene) -> list[tuple[int, str]]:
    """What could be dropped: every named attribute but the shapes."""
    out = [(k, a) for k, o in enumerate(named.objects) for a in OBJECT_ATTRIBUTES[1:] if getattr(o, a) is not None]
    return out + ([(-1, "background")] if named.background is not None and named.objects else [])


def _set_detail(named: Scene, where: tuple[int, str], full: Scene | None) -> Scene:
    """`named` with one attribute set to the complete scene's value (or dropped when `full` is None)."""
    k, attr = where
    if k < 0:
        return Scene(named.objects, None if full is None else full.background)
    objs = list(named.objects)
    objs[k] = replace(objs[k], **{attr: None if full is None else getattr(full.objects[k], attr)})
    return Scene(tuple(objs), named.background)


def _apply_edit(full: Scene, named: Scene, edit: str, rng: np.random.Generator) -> tuple[Scene, Scene] | None:
    """(complete scene, named part) after `edit`, or None when the edit does not apply here.

    `named` keeps `full`'s object order (index k of one is index k of the other).
    """
    if edit == "add_detail":
        todo = _unnamed(named)
        return None if not todo else (full, _set_detail(named, todo[rng.integers(len(todo))], full))
    if edit == "drop_detail":
        todo = _named_details(named)
        return None if not todo else (full, _set_detail(named, todo[rng.integers(len(todo))], None))
    if edit == "change_attribute":
        return _change_object(full, named, rng) if named.objects else None
    if edit == "change_background":
        if named.background is None:
            return None
        used = {o.color for o in full.objects} | {full.background}
        color = str(rng.choice([c for c in COLORS if c not in used]))
        return Scene(full.objects, color), Scene(named.objects, color)
    if edit == "add_object":
        if len(full.objects) >= 3:
            return None
        pos = _free_positions(full)
        new = random_object(rng, pos[rng.integers(len(pos))], full.background)
        shown = named_part(Scene((new,), full.background), rng, complete_share=0.3).objects[0]
        return Scene((*full.objects, new), full.background), Scene((*named.objects, shown), named.background)
    if edit == "remove_object":
        if len(full.objects) < 2:
            return None
        k = int(rng.integers(len(full.objects)))
        drop = lambda objs: tuple(o for i, o in enumerate(objs) if i != k)  # noqa: E731
        return Scene(drop(full.objects), full.background), Scene(drop(named.objects), named.background)
    raise ValueError(f"unknown edit {edit!r}")


def _scene_in_split(rng: np.random.Generator, split: str) -> Scene:
    for _ in range(_MAX_TRIES * 10):
        scene = random_scene(rng)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError("no scene found in split")  # pragma: no cover


def _start(rng: np.random.Generator, split: str) -> tuple[Scene, Scene]:
    full = _scene_in_split(rng, split)
    return full, named_part(full, rng, complete_share=START_COMPLETE_SHARE)


def _round(named: Scene, style, edit: str) -> dict:
    return {"prompt": caption_with_style(named, style), "scene": named.canonical().to_dict(), "edit": edit}


def _session(rng: np.random.Generator, split: str, index: int) -> dict:
    n_rounds = int(rng.integers(3, 9))
    full, named = _start(rng, split)
    style = sample_style(rng)
    rounds = [_round(named, style, "start")]
    names = list(EDIT_WEIGHTS)
    probs = np.array([EDIT_WEIGHTS[e] for e in names])
    probs = probs / probs.sum()
    while len(rounds) < n_rounds:
        edit = names[rng.choice(len(names), p=probs)]
        if edit == "start_over":
            full, named = _start(rng, split)
            style = sample_style(rng)
        elif edit == "reword":
            new_style = sample_style(rng)
            if caption_with_style(named, new_style) == rounds[-1]["prompt"]:
                continue
            style = new_style
        else:
            edited = None
            for _ in range(_MAX_TRIES):
                candidate = _apply_edit(full, named, edit, rng)
                if candidate is None:
                    break
                if scene_split(candidate[0]) == split:
                    edited = candidate
                    break
            if edited is None:
                continue  # the edit does not apply here; draw another
            full, named = edited
        round_ = _round(named, style, edit)
        if round_["prompt"] == rounds[-1]["prompt"] and edit != "start_over":
            continue
        rounds.append(round_)
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


def normalize_session(session: dict, index: int = 0) -> dict:
    """A session whose rounds may be plain strings (``{"rounds": ["a circle", "a red circle"]}``)
    as one whose rounds are objects: {"prompt", "scene", "edit"}. A round without a scene gets
    the one `parse_prompt` reads from its prompt (None outside the world's vocabulary).

    Raises ValueError naming what is wrong when the session has no usable rounds.
    """
    if not isinstance(session, dict) or not isinstance(session.get("rounds"), list) or not session["rounds"]:
        raise ValueError("needs a non-empty 'rounds' list (prompts, or objects with a 'prompt')")
    rounds = []
    for k, r in enumerate(session["rounds"]):
        if isinstance(r, str):
            r = {"prompt": r}
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"round {k + 1} needs a non-empty prompt (a string, or an object with a 'prompt')")
        scene = r.get("scene")
        if scene is None:
            parsed = parse_prompt(r["prompt"])
            scene = None if parsed is None else parsed.to_dict()
        rounds.append({**r, "scene": scene, "edit": r.get("edit", "start" if k == 0 else None)})
    return {**session, "id": str(session.get("id", f"session-{index:05d}")), "rounds": rounds}


def write_jsonl(sessions: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in sessions)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
