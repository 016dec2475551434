"""`diffusionx bench-edits`: does attention control keep the picture through a one-word edit?

On the embedded world's test sessions, every consecutive pair of rounds whose prompts differ by
exactly one swapped word (an attribute edit: shape, color, size, position, or the background
color) is an edit. For each, with the edge model (`--side cloud`: the cloud one) and one seed:

- *previous*: the previous round's prompt, generated from noise;
- *plain*: the new prompt, generated from the same noise (plain re-generation);
- *controlled*: the new prompt under Prompt-to-Prompt from the previous round.

The evaluator reads every image (background, and per grid position: object present, shape,
color, size). Scores:

- ``kept``: of the attributes the edit did *not* touch (the other objects' presence, shape,
  color and size; the edited object's other attributes and presence; the background) and that
  the previous image showed correctly, the fraction still shown correctly in the new image;
- ``edited_right``: the fraction of edits whose edited attribute reads as the new value.

The bars are computed on the edits the session's `auto` rule sends to control (all but position
edits, which move the layout and go to SDEdit); position edits are reported apart.

`--sessions FILE` reads the edits from your own sessions instead (rounds may be plain strings;
their scenes are read from the prompts). The checks read objects at their grid positions, so
only edits between prompts that name every object's position count; attributes a prompt leaves
unsaid are not checked.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..world import generate_sessions
from ..world.scene import Scene
from .attention import ControlConfig
from .controller import RoundSpec, controlled_generate
from .prompts import split_words
from .rounds import auto_mode


@dataclass
class Edit:
    session: str
    round: int
    previous_prompt: str
    prompt: str
    previous_scene: Scene
    scene: Scene
    attribute: str  # shape | color | size | position | background
    words: tuple[str, str]


def _scene(d: dict) -> Scene:
    return Scene.from_dict(d)


def _edited(prev: Scene, new: Scene) -> tuple[str, Any, Any] | None:
    """(attribute, previous object or None, new object or None) of a single-attribute edit: one
    named value replaced by another (not an attribute named or dropped)."""
    if prev.background != new.background:
        if None in (prev.background, new.background):
            return None
        return ("background", None, None) if list(prev.objects) == list(new.objects) else None
    if len(prev.objects) != len(new.objects):
        return None
    gone = [o for o in prev.objects if o not in new.objects]
    came = [o for o in new.objects if o not in prev.objects]
    if len(gone) != 1 or len(came) != 1:
        return None
    a, b = gone[0], came[0]
    diffs = [f for f in ("shape", "color", "size", "position") if getattr(a, f) != getattr(b, f)]
    if len(diffs) != 1 or None in (getattr(a, diffs[0]), getattr(b, diffs[0])):
        return None
    return diffs[0], a, b


def _session_edits(session: dict) -> list[Edit]:
    """The one-word attribute edits between consecutive rounds of one session whose scenes place
    every object (the checks read objects at their grid positions)."""
    edits = []
    rounds = session["rounds"]
    for k in range(1, len(rounds)):
        prev, cur = rounds[k - 1], rounds[k]
        if cur.get("edit") not in ("change_attribute", "change_background", None):
            continue  # an edit label that says it is no attribute swap (None: not labelled)
        if prev.get("scene") is None or cur.get("scene") is None:
            continue  # a prompt outside the world's vocabulary
        a, b = split_words(prev["prompt"]), split_words(cur["prompt"])
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        if len(a) != len(b) or len(diff) != 1:
            continue
        ps, cs = _scene(prev["scene"]), _scene(cur["scene"])
        if any(o.position is None for o in (*ps.objects, *cs.objects)):
            continue
        what = _edited(ps, cs)
        if what is None:
            continue
        edits.append(Edit(session["id"], k + 1, prev["prompt"], cur["prompt"], ps, cs, what[0], diff[0]))
    return edits


def one_word_edits(
    n: int, split: str = "test", max_sessions: int = 4000, sessions: list[dict] | None = None
) -> list[Edit]:
    """The first `n` one-word attribute edits of the split's sessions, or of `sessions` (rounds as
    `world.sessions.normalize_session` gives them)."""
    if sessions is not None:
        return [e for s in sessions for e in _session_edits(s)][:n]
    edits: list[Edit] = []
    batch = 200
    total = 0
    while len(edits) < n and total < max_sessions:
        total += batch
        edits = [e for s in generate_sessions(total, split) for e in _session_edits(s)]
    return edits[:n]


def _checks(edit: Edit) -> tuple[list[tuple[str, str, Any]], tuple[str, str, Any]]:
    """Unchanged checks [(position or '', attribute, value)] and the edited check."""
    unchanged: list[tuple[str, str, Any]] = []
    what = _edited(edit.previous_scene, edit.scene)
    assert what is not None
    attribute, _old, new = what
    for obj in edit.scene.objects:
        if new is not None and obj == new:
            if attribute != "position":
                unchanged.append((obj.position, "present", True))
            for f in ("shape", "color", "size"):
                if f != attribute:
                    unchanged.append((obj.position, f, getattr(obj, f)))
            continue
        unchanged.append((obj.position, "present", True))
        for f in ("shape", "color", "size"):
            unchanged.append((obj.position, f, getattr(obj, f)))
    unchanged = [c for c in unchanged if c[2] is not None]  # what the prompts leave unsaid is not checked
    if attribute == "background":
        return unchanged, ("", "background", edit.scene.background)
    if edit.scene.background is not None:
        unchanged.append(("", "background", edit.scene.background))
    if attribute == "position":
        return unchanged, (new.position, "present", True)
    return unchanged, (new.position, attribute, getattr(new, attribute))


def _read(pred: dict, check: tuple[str, str, Any]) -> Any:
    position, attribute, _ = check
    if attribute == "background":
        return pred["background"]
    obj = pred["objects"].get(position)
    if attribute == "present":
        return obj is not None
    return None if obj is None else obj[attribute]


def _label(image: Image.Image, text: str, size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size + 14), "white")
    canvas.paste(image.resize((size, size), Image.NEAREST), (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text[:24], fill="black")
    return canvas


def edit_grid(rows: list[tuple[Image.Image, Image.Image, Image.Image, str]], cell: int = 128) -> Image.Image:
    """Rows of (previous, plain, controlled, label); columns titled."""
    h = cell + 14
    grid = Image.new("RGB", (3 * cell + 4 * 4 + 110, 22 + len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("previous round", "plain re-generation", "controlled edit")):
        draw.text((4 + c * (cell + 4), 6), title, fill="black")
    for r, (prev, plain, ctl, label) in enumerate(rows):
        y = 22 + r * (h + 4)
        for c, (img, tag) in enumerate(((prev, "before"), (plain, "plain"), (ctl, "controlled"))):
            grid.paste(_label(img, tag, cell), (4 + c * (cell + 4), y))
        draw.text((4 + 3 * (cell + 4), y + h // 2), label, fill="black")
    return grid


def bench_edits(
    pair,
    *,
    n: int = 48,
    out_dir: str | Path = "outputs/bench-edits",
    steps: int = 20,
    seed: int = 0,
    config: ControlConfig | None = None,
    guidance_scale: float = 7.5,
    evaluator=None,
    progress: bool = True,
    side: str = "edge",
    sessions: list[dict] | None = None,
) -> dict[str, Any]:
    """`side`: the model that runs the rounds: the edge one (where edits happen), or the cloud one
    to see how the same control does with a stronger model. `sessions`: take the edits from these
    (normalized) sessions instead of the embedded world's test split."""
    from tqdm.auto import tqdm

    from ..metrics import get_evaluator

    config = config or ControlConfig()
    evaluator = evaluator or get_evaluator()
    if side not in ("edge", "cloud"):
        raise ValueError(f"side must be 'edge' or 'cloud', got {side!r}")
    engine = pair.edge if side == "edge" else pair.cloud
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edits = one_word_edits(n, sessions=sessions)
    start = time.perf_counter()
    prev_imgs, plain_imgs, ctl_imgs = [], [], []
    mask_fractions: list[float | None] = []
    ctl_seconds = 0.0
    # Plain re-generations: all in one batched run (the engine batches unhooked jobs).
    t = time.perf_counter()
    guidance = guidance_scale > 1.0
    jobs = [
        engine.start(engine.encode_prompt(e.prompt, guidance=guidance), seed=seed, steps=steps,
                     guidance_scale=guidance_scale)
        for e in edits
    ]
    for k in range(0, len(jobs), 16):
        engine.run(jobs[k : k + 16], progress=progress, desc="plain re-generations")
    plain_imgs = [engine.decode(job.latents)[0] for job in jobs]
    plain_seconds = time.perf_counter() - t
    for edit in tqdm(edits, desc="controlled edits", disable=not progress):
        t = time.perf_counter()
        ctl = controlled_generate(
            engine, edit.prompt, RoundSpec(edit.previous_prompt, seed=seed), steps=steps, config=config,
            guidance_scale=guidance_scale,
        )
        ctl_seconds += time.perf_counter() - t
        if ctl.source_latents is not None:  # the replayed previous round (bit-exact)
            prev_latents = ctl.source_latents
        else:
            prev_latents = engine.generate(
                edit.previous_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, decode=False
            ).latents
        prev_imgs.append(engine.decode(prev_latents)[0])
        ctl_imgs.append(ctl.image)
        mask_fractions.append(None if ctl.mask is None else float(ctl.mask.float().mean()))
    preds = evaluator.predict_attributes(prev_imgs + plain_imgs + ctl_imgs)
    m = len(edits)
    p_prev, p_plain, p_ctl = preds[:m], preds[m : 2 * m], preds[2 * m :]

    per_edit = []
    for i, edit in enumerate(edits):
        unchanged, edited = _checks(edit)
        base = [c for c in unchanged if _read(p_prev[i], c) == c[2]]
        per_edit.append({
            "session": edit.session,
            "round": edit.round,
            "attribute": edit.attribute,
            "words": list(edit.words),
            "previous_prompt": edit.previous_prompt,
            "prompt": edit.prompt,
            "routed_to": auto_mode(edit.previous_prompt, edit.prompt)[0],
            "unchanged_checks": len(unchanged),
            "previously_right": len(base),
            "plain_kept": sum(_read(p_plain[i], c) == c[2] for c in base),
            "controlled_kept": sum(_read(p_ctl[i], c) == c[2] for c in base),
            "previous_edited_right": _read(p_prev[i], edited) == edited[2],
            "plain_edited_right": _read(p_plain[i], edited) == edited[2],
            "controlled_edited_right": _read(p_ctl[i], edited) == edited[2],
            "blend_mask_fraction": mask_fractions[i],
        })

    def summary(rows: list[dict]) -> dict[str, Any]:
        base = sum(r["previously_right"] for r in rows)
        return {
            "edits": len(rows),
            "unchanged_checks": base,
            "controlled_kept": sum(r["controlled_kept"] for r in rows) / base if base else None,
            "plain_kept": sum(r["plain_kept"] for r in rows) / base if base else None,
            "edited_right": float(np.mean([r["controlled_edited_right"] for r in rows])) if rows else None,
            "plain_edited_right": float(np.mean([r["plain_edited_right"] for r in rows])) if rows else None,
        }

    controlled_rows = [r for r in per_edit if r["routed_to"] == "controlled"]
    result: dict[str, Any] = {
        **summary(controlled_rows),
        "scope": "one-word edits the auto rule sends to control (shape, color, size, background)",
        "all_one_word_edits": summary(per_edit),
        "by_attribute": {
            a: summary([r for r in per_edit if r["attribute"] == a])
            for a in sorted({r["attribute"] for r in per_edit})
        },
        "bars": {"controlled_kept": ">= 0.90 and >= plain_kept + 0.20", "edited_right": ">= 0.80"},
        "model": pair.describe() if hasattr(pair, "describe") else str(pair),
        "side": side,
        "steps": steps,
        "seed": seed,
        "config": config.__dict__,
        "seconds": time.perf_counter() - start,
        "plain_seconds_per_round_batched": plain_seconds / max(1, m),
        "controlled_seconds_per_round": ctl_seconds / max(1, m),
        "per_edit": per_edit,
    }
    ok_kept = result["controlled_kept"] is not None and result["plain_kept"] is not None
    result["meets_bars"] = bool(
        ok_kept
        and result["controlled_kept"] >= 0.90
        and result["controlled_kept"] >= result["plain_kept"] + 0.20
        and (result["edited_right"] or 0) >= 0.80
    )
    rows = [
        (prev_imgs[i], plain_imgs[i], ctl_imgs[i], f"{edit.words[0]} -> {edit.words[1]}")
        for i, edit in enumerate(edits[:16])
    ]
    edit_grid(rows).save(out / "edits_grid.png")
    (out / "edits.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def cmd_bench_edits(args) -> int:
    from ..engine import check_seed, check_steps
    from ..errors import InvalidInputError
    from ..models import load_pair

    check_steps(args.steps)
    check_seed(args.seed)
    if args.n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {args.n}")
    try:
        given = {"cross_steps": args.cross_steps, "self_steps": args.self_steps,
                 "blend_threshold": args.blend_threshold}  # None: the controller's default
        config = ControlConfig(local_blend=not args.no_blend, **{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise InvalidInputError(str(err)) from err
    sessions = None
    if args.sessions:
        from ..bench.run import load_sessions

        sessions, _ = load_sessions(args.sessions, sys.maxsize)
        if not one_word_edits(1, sessions=sessions):
            raise InvalidInputError(
                f"{args.sessions} has no one-word attribute edits between rounds that place every object "
                "(e.g. 'a red circle on the left' -> 'a blue circle on the left')"
            )
    pair = load_pair(args.model)
    result = bench_edits(pair, n=args.n, out_dir=args.out, steps=args.steps, seed=args.seed, config=config,
                         side=args.side, sessions=sessions)
    print(f"model: {args.side} {getattr(pair, f'{args.side}_info').label}")
    for key in ("edits", "controlled_kept", "plain_kept", "edited_right", "plain_edited_right"):
        value = result[key]
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for attribute, s in result["by_attribute"].items():
        print(f"  {attribute}: {s['edits']} edits, kept {s['controlled_kept']} (plain {s['plain_kept']}), "
              f"edited right {s['edited_right']}")
    print(f"meets bars: {result['meets_bars']}")
    print(f"wrote {args.out}/edits.json and {args.out}/edits_grid.png")
    return 0
