"""`diffusionx bench-edits`: does a round-to-round edit keep what the user did not change?

Measured as editing benchmarks do (PIE-Bench, Direct Inversion, ICLR'24: PSNR / SSIM of the
unedited region), with the region taken from the world's exact object boxes instead of hand-drawn
masks. For each consecutive pair of rounds k -> k+1 of the test sessions (every edit kind the
session generator makes: add / drop a detail, change an attribute or the background, add / remove
an object, reword) the previous round is generated from noise with one seed, then the next one by
each method:

- ``fresh``: the new prompt from the same noise (plain re-generation);
- ``sdedit``: SDEdit from the previous round's latent at the policy's strength;
- ``p2p``: Prompt-to-Prompt: the previous round's trajectory re-walked under the new prompt with
  its attention injected (replace / refine / reweight as the word edit calls for), no local blend;
- ``p2p_blend``: the same with the local blend (only where the edited words attend changes);
- ``local``: a local edit, as a session's local round makes it (`control.mask.plan_local_edit`):
  DiffEdit's mask of what the edit changes, from the previous latent and the two prompts,
  regenerated at `local_strength` inside it while the previous latent is kept outside it
  (`Engine.start(edit_mask=...)`); a new backdrop is painted around the objects' cores and the
  objects' pixels are pasted back (`control.mask.paste_objects`);
- ``p2p_local``: Prompt-to-Prompt with the local blend's mask taken from DiffEdit (the same as
  ``local``'s) instead of from attention: the re-walk makes the edit, the source's latents are
  kept outside the mask;
- ``auto``: what a session's `auto` round mode does with the edit (`control.rounds.auto_mode`:
  the shipped per-kind table, word rules for the rest): each edit takes the image of the method its
  mode runs, and that method's cost. The table must come from other edits than the ones measured
  (`--split validation --write-auto-modes`, then the test split), or the choice is fitted to them.

Scores, per edit and as means per edit kind and method:

- ``unedited_psnr`` / ``unedited_ssim``: between the previous and the new image on the pixels the
  edit should not touch: outside the edited objects' boxes grown by a margin (for a background
  edit: inside the objects' boxes; for a reword: the whole image);
- ``psnr`` / ``ssim``: the same on the whole image;
- ``edited_right``: the evaluator reads the edited part as the new prompt says (new or changed
  object's named attributes at its position, a removed object gone, the new background);
- ``kept``: of the untouched named attributes the previous image rendered right, the share the new
  image still renders right.

Only edits whose edited objects (and, for a background edit, all objects) have a named position are
measured: the box of an object the prompt does not place is unknown. `--sessions FILE` takes the
edits from your own sessions (rounds may be plain strings).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..engine import steps_for_strength
from ..metrics.image import mean_ci95, psnr, ssim
from ..world import generate_sessions
from ..world.scene import POSITION_XY, SIZE_FRACTION, Scene
from .attention import ControlConfig
from .controller import RoundSpec, controlled_generate
from .mask import LOCAL_FREE_STEPS, LOCAL_STRENGTH
from .rounds import auto_mode, changed_objects, infer_kind

METHODS = ("fresh", "sdedit", "p2p", "p2p_blend", "local", "p2p_local", "auto")
CONTROLLED = ("p2p", "p2p_blend", "local", "p2p_local")  # the methods that control what the edit may change
# The session's round mode of each controlled method it has (p2p_local is measured, not a mode).
MODE_OF = {"p2p": "controlled", "p2p_blend": "controlled", "local": "local"}
# The method that renders each round mode (a session's controlled round blends locally).
METHOD_OF_MODE = {"fresh": "fresh", "sdedit": "sdedit", "controlled": "p2p_blend", "local": "local"}
EDIT_KINDS = ("add_detail", "drop_detail", "change_attribute", "change_background", "add_object", "remove_object",
              "reword")
BARS = {
    "unedited_psnr": "controlled >= 25 dB and >= SDEdit + 3 dB",
    "edited_right": "controlled >= fresh - 0.05",
    "kept": "controlled >= 0.95",
}
BOX_MARGIN = 0.06  # of the image width: model images are not pixel-exact renders
# Identical pixels have infinite PSNR; they count as one gray level of error everywhere (48.1 dB),
# so a method that keeps a region exactly is averaged in, not dropped.
PSNR_CEILING = 10 * np.log10(255.0**2)


@dataclass
class RoundEdit:
    session: str
    round: int  # the new round's number (2 = the edit from round 1 to round 2)
    kind: str  # the session generator's edit label (None-labelled plain sessions: inferred)
    previous_prompt: str
    prompt: str
    previous_scene: Scene
    scene: Scene


def object_box(obj, size: int, margin: float = BOX_MARGIN) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a placed object, grown by `margin` of the width. An object
    without a size counts as large (the bigger box is the safe one)."""
    fx, fy = POSITION_XY[obj.position]
    half = (SIZE_FRACTION[obj.size or "large"] / 2 + margin) * size
    x0, y0 = max(0, int(np.floor(fx * size - half))), max(0, int(np.floor(fy * size - half)))
    return x0, y0, min(size, int(np.ceil(fx * size + half))), min(size, int(np.ceil(fy * size + half)))


def unedited_mask(edit: RoundEdit, size: int = 64) -> np.ndarray | None:
    """True where the edit should leave the image alone; None when that region is unknown (an
    edited object without a position) or empty."""
    prev, new = edit.previous_scene, edit.scene
    gone, came = changed_objects(prev, new)
    if prev.background != new.background:
        if gone or came or not new.objects or any(o.position is None for o in new.objects):
            return None
        mask = np.zeros((size, size), bool)
        for obj in new.objects:
            x0, y0, x1, y1 = object_box(obj, size, margin=-BOX_MARGIN / 2)  # inside, away from the edges
            mask[y0:y1, x0:x1] = True
        return mask if mask.any() else None
    changed = gone + came
    if any(o.position is None for o in changed):
        return None
    mask = np.ones((size, size), bool)
    for obj in changed:
        x0, y0, x1, y1 = object_box(obj, size)
        mask[y0:y1, x0:x1] = False
    return mask if mask.any() else None


def round_edits(n: int, split: str = "test", sessions: list[dict] | None = None,
                max_sessions: int = 4000) -> list[RoundEdit]:
    """`n` measurable round edits of the split's sessions, about as many of each kind as there are
    (or the first `n` of `sessions`)."""

    def of(session: dict) -> list[RoundEdit]:
        out = []
        rounds = session["rounds"]
        for k in range(1, len(rounds)):
            prev, cur = rounds[k - 1], rounds[k]
            if prev.get("scene") is None or cur.get("scene") is None or cur.get("edit") in ("start", "start_over"):
                continue
            ps, cs = Scene.from_dict(prev["scene"]), Scene.from_dict(cur["scene"])
            kind = cur.get("edit") or infer_kind(ps, cs)
            if kind not in EDIT_KINDS:
                continue
            edit = RoundEdit(session["id"], k + 1, kind, prev["prompt"], cur["prompt"], ps, cs)
            if unedited_mask(edit) is not None:
                out.append(edit)
        return out

    if sessions is not None:
        return [e for s in sessions for e in of(s)][:n]
    # Every kind gets its share (the session mix is mostly attribute changes), the rest in order.
    quota = -(-n // len(EDIT_KINDS))
    edits: list[RoundEdit] = []
    total = 0
    while total < max_sessions:
        total += 400
        edits = [e for s in generate_sessions(total, split) for e in of(s)]
        counts = {k: sum(e.kind == k for e in edits) for k in EDIT_KINDS}
        if len(edits) >= n and all(c >= quota for c in counts.values()):
            break
    taken: dict[str, int] = dict.fromkeys(EDIT_KINDS, 0)
    chosen = []
    for e in edits:
        if taken[e.kind] < quota:
            taken[e.kind] += 1
            chosen.append(e)
    chosen += [e for e in edits if e not in chosen][: max(0, n - len(chosen))]
    return chosen[:n]


# ----- attribute checks -----------------------------------------------------------------------
def _read(pred: dict, position: str, attribute: str) -> Any:
    if attribute == "background":
        return pred["background"]
    obj = pred["objects"].get(position)
    if attribute == "present":
        return obj is not None
    return None if obj is None else obj[attribute]


def edit_checks(edit: RoundEdit) -> tuple[list[tuple], list[tuple]]:
    """(edited checks, untouched checks), each (position, attribute, value): the edited part as
    the new prompt names it, and every named attribute the edit leaves alone."""
    prev, new = edit.previous_scene, edit.scene
    gone, came = changed_objects(prev, new)
    edited: list[tuple] = []
    for obj in came:
        edited.append((obj.position, "present", True))
        edited += [(obj.position, f, getattr(obj, f)) for f in ("shape", "color", "size") if getattr(obj, f)]
    for obj in gone:
        if obj.position not in {o.position for o in came}:
            edited.append((obj.position, "present", False))
    if prev.background != new.background and new.background is not None:
        edited.append(("", "background", new.background))
    untouched: list[tuple] = []
    for obj in new.objects:
        if obj in came or obj.position is None:
            continue
        untouched.append((obj.position, "present", True))
        untouched += [(obj.position, f, getattr(obj, f)) for f in ("shape", "color", "size") if getattr(obj, f)]
    if prev.background == new.background and new.background is not None:
        untouched.append(("", "background", new.background))
    return edited, untouched


# ----- the benchmark ----------------------------------------------------------------------------
def _label(image: Image.Image, text: str, size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size + 14), "white")
    canvas.paste(image.resize((size, size), Image.NEAREST), (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text[:24], fill="black")
    return canvas


def edit_grid(rows: list[tuple[list[Image.Image], str]], titles: tuple[str, ...], cell: int = 112) -> Image.Image:
    """Rows of (images, label) under column titles."""
    h, columns = cell + 14, len(titles)
    grid = Image.new("RGB", (columns * (cell + 4) + 4 + 190, 22 + len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((4 + c * (cell + 4), 6), title, fill="black")
    for r, (images, label) in enumerate(rows):
        y = 22 + r * (h + 4)
        for c, (img, tag) in enumerate(zip(images, titles)):
            grid.paste(_label(img, tag, cell), (4 + c * (cell + 4), y))
        draw.text((4 + columns * (cell + 4), y + h // 2), label[:32], fill="black")
    return grid


def _mean(values: list) -> float | None:
    return mean_ci95(values)[0]


def _interval(values: list) -> list[float] | None:
    return mean_ci95(values)[1]


def bench_edits(
    pair,
    *,
    n: int = 96,
    out_dir: str | Path = "outputs/bench-edits",
    steps: int | None = None,
    seed: int = 0,
    config: ControlConfig | None = None,
    policy=None,
    guidance_scale: float = 7.5,
    evaluator=None,
    progress: bool = True,
    side: str = "edge",
    sessions: list[dict] | None = None,
    batch: int = 16,
    local_strength: float = LOCAL_STRENGTH,
    local_free: float = LOCAL_FREE_STEPS,
    methods: tuple[str, ...] = METHODS,
    split: str = "test",
) -> dict[str, Any]:
    """Measure `methods` (default all) on `n` round edits of the world's `split` (or of
    `sessions`); writes edits.json, results.md and edits_grid.png. `policy` picks SDEdit's strength
    (default: fixed 0.6); `side` the model that runs the rounds; `local_strength` the local edit's.
    `auto` also runs the methods its modes need."""
    from tqdm.auto import tqdm

    from ..metrics import get_evaluator
    from ..policies import FixedStrength

    steps = pair.steps_or_default(steps)
    config = config or ControlConfig()
    policy = policy or FixedStrength()
    evaluator = evaluator or get_evaluator()
    if side not in ("edge", "cloud"):
        raise ValueError(f"side must be 'edge' or 'cloud', got {side!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "fresh" not in methods or "sdedit" not in methods:
        raise ValueError(f"methods must include fresh and sdedit (the references) and come from {', '.join(METHODS)}; "
                         f"got {', '.join(methods)}")
    engine = pair.edge if side == "edge" else pair.cloud
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edits = round_edits(n, split=split, sessions=sessions)
    if not edits:
        raise ValueError("no measurable round edits (edited objects need a named position)")
    modes = [auto_mode(e.previous_prompt, e.prompt)[0] for e in edits]  # what a session's auto round does
    auto_sources = [METHOD_OF_MODE[mode] for mode in modes] if "auto" in methods else []
    methods = tuple(m for m in METHODS if m in methods or m in auto_sources)
    start = time.perf_counter()
    guidance = guidance_scale > 1.0
    seconds: dict[str, float] = dict.fromkeys(("previous", *methods), 0.0)

    def batched(kind: str, make_job) -> list[torch.Tensor]:
        t = time.perf_counter()
        jobs = [make_job(i, e) for i, e in enumerate(edits)]
        for k in range(0, len(jobs), batch):
            engine.run(jobs[k : k + batch], progress=progress, desc=kind)
        seconds[kind] += time.perf_counter() - t
        return [job.latents for job in jobs]

    def fresh_job(prompt: str):
        return engine.start(engine.encode_prompt(prompt, guidance=guidance), seed=seed, steps=steps,
                            guidance_scale=guidance_scale)

    previous = batched("previous", lambda i, e: fresh_job(e.previous_prompt))
    fresh = batched("fresh", lambda i, e: fresh_job(e.prompt))
    strengths = [float(policy.edge_strength(e.previous_prompt, e.prompt, previous[i])) for i, e in enumerate(edits)]
    sdedit = batched("sdedit", lambda i, e: engine.start(
        engine.encode_prompt(e.prompt, guidance=guidance), seed=seed, steps=steps, strength=strengths[i],
        init_latents=previous[i] if strengths[i] < 1.0 else None, guidance_scale=guidance_scale))
    latents: dict[str, list[torch.Tensor]] = {"previous": previous, "fresh": fresh, "sdedit": sdedit}
    masks: list[torch.Tensor] = []
    plans = []
    if "local" in methods or "p2p_local" in methods:
        from .mask import plan_local_edit

        t = time.perf_counter()
        plans = [plan_local_edit(engine, previous[i], e.previous_prompt, e.prompt, seed=seed)
                 for i, e in enumerate(edits)]
        masks = [plan.region for plan in plans]
        mask_s = time.perf_counter() - t
        for method in ("local", "p2p_local"):
            if method in methods:
                seconds[method] += mask_s
    if "local" in methods:
        latents["local"] = batched("local", lambda i, e: engine.start(
            engine.encode_prompt(e.prompt, guidance=guidance), seed=seed, steps=steps, strength=local_strength,
            init_latents=previous[i], guidance_scale=guidance_scale, edit_mask=masks[i],
            free_steps=round(local_free * steps_for_strength(local_strength, steps))))
    for method, blend in (("p2p", False), ("p2p_blend", True), ("p2p_local", False)):  # one edit at a time
        if method not in methods:
            continue
        method_config = replace(config, local_blend=blend)
        latents[method] = []
        t = time.perf_counter()
        for i, e in enumerate(tqdm(edits, desc=method, disable=not progress)):
            out_gen = controlled_generate(engine, e.prompt, RoundSpec(e.previous_prompt, seed=seed), steps=steps,
                                          config=method_config, guidance_scale=guidance_scale, decode=False,
                                          blend_mask=masks[i] if method == "p2p_local" else None)
            latents[method].append(out_gen.latents)
        seconds[method] += time.perf_counter() - t
    images = {k: [np.asarray(engine.decode(z)[0]) for z in v] for k, v in latents.items()}
    if "local" in methods:  # a new backdrop's local round puts the objects' own pixels back, as a session does
        from .mask import paste_objects

        images["local"] = [
            img if plan.objects is None else np.asarray(paste_objects(
                Image.fromarray(images["previous"][i]), Image.fromarray(img), plan.objects))
            for i, (img, plan) in enumerate(zip(images["local"], plans))
        ]
    m = len(edits)
    if auto_sources:
        images["auto"] = [images[source][i] for i, source in enumerate(auto_sources)]
        seconds["auto"] = sum(seconds[source] / m for source in auto_sources)
    order = ("previous", *methods)
    preds = evaluator.predict_attributes(np.stack([img for k in order for img in images[k]]))
    pred = {k: preds[j * m : (j + 1) * m] for j, k in enumerate(order)}

    per_edit = []
    for i, e in enumerate(edits):
        mask = unedited_mask(e, images["previous"][i].shape[0])
        edited, untouched = edit_checks(e)
        base = [c for c in untouched if _read(pred["previous"][i], c[0], c[1]) == c[2]]
        row: dict[str, Any] = {
            "session": e.session, "round": e.round, "kind": e.kind, "previous_prompt": e.previous_prompt,
            "prompt": e.prompt, "auto_mode": modes[i],
            "sdedit_strength": strengths[i], "unedited_fraction": float(mask.mean()),
            "untouched_checks": len(untouched), "previously_right": len(base), "methods": {},
        }
        if masks:  # how much the local edit regenerated, and how much of the region to keep it spared
            edit_region = F.interpolate(masks[i].float(), size=mask.shape, mode="nearest")[0, 0].cpu().numpy() > 0.5
            row["local_mask"] = {"area": float(edit_region.mean()),
                                 "spares_unedited": float((~edit_region)[mask].mean())}
        for method in methods:
            a, b, p = images["previous"][i], images[method][i], pred[method][i]
            row["methods"][method] = {
                "unedited_psnr": min(psnr(a, b, mask), PSNR_CEILING), "unedited_ssim": ssim(a, b, mask),
                "psnr": min(psnr(a, b), PSNR_CEILING), "ssim": ssim(a, b),
                "edited_right": (all(_read(p, c[0], c[1]) == c[2] for c in edited) if edited else None),
                "kept": (sum(_read(p, c[0], c[1]) == c[2] for c in base) / len(base)) if base else None,
            }
        per_edit.append(row)

    def summarize(rows: list[dict]) -> dict[str, Any]:
        summary: dict[str, Any] = {"edits": len(rows)}
        for method in methods:
            cells = [r["methods"][method] for r in rows]
            summary[method] = {
                key: _mean([c[key] for c in cells]) for key in ("unedited_psnr", "unedited_ssim", "psnr", "ssim")
            }
            summary[method]["unedited_psnr_ci95"] = _interval([c["unedited_psnr"] for c in cells])
            right = [c["edited_right"] for c in cells if c["edited_right"] is not None]
            summary[method]["edited_right"] = float(np.mean(right)) if right else None
            summary[method]["kept"] = _mean([c["kept"] for c in cells])
        return summary

    by_kind = {k: summarize([r for r in per_edit if r["kind"] == k]) for k in EDIT_KINDS}
    overall = summarize(per_edit)
    met_by = _bars_met_by(overall)
    result: dict[str, Any] = {
        "overall": overall,
        "by_kind": by_kind,
        "best_controlled": _best_controlled(overall),
        "meets_bars": bool(met_by),
        "bars_met_by": met_by,
        "bars": BARS,
        "cost": {k: {"seconds_per_edit": v / m} for k, v in seconds.items()},
        "model": pair.describe() if hasattr(pair, "describe") else str(pair),
        "side": side, "split": None if sessions is not None else split, "steps": steps, "seed": seed,
        "config": config.__dict__, "methods": list(methods),
        "local_strength": local_strength if "local" in methods else None,
        "local_free_steps": local_free if "local" in methods else None,
        "seconds": time.perf_counter() - start,
        "per_edit": per_edit,
    }
    rows = [([Image.fromarray(images[k][i]) for k in order], f"{e.kind}: {e.prompt}") for i, e in enumerate(edits[:12])]
    edit_grid(rows, order).save(out / "edits_grid.png")
    (out / "edits.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(results_table(result))
    return result


def choose_modes(result: dict, psnr_margin: float = 1.0, right_margin: float = 0.05) -> dict[str, dict]:
    """Per edit kind, the round mode that pays, from a bench-edits result: of the controlled methods
    (attention control, local edit) that keep the unedited region better than SDEdit (by
    `psnr_margin` dB) and still make the edit about as often as fresh generation (within
    `right_margin`), the one that keeps it best; else SDEdit when it makes the edit as often; else
    fresh generation."""
    def makes_the_edit(summary: dict, method: str) -> bool:
        fresh, right = summary["fresh"]["edited_right"], summary[method]["edited_right"]
        return fresh is None or right is None or right >= fresh - right_margin

    chosen = {}
    for kind, summary in result["by_kind"].items():
        if not summary["edits"]:
            continue
        sdedit_psnr = summary["sdedit"]["unedited_psnr"] or 0.0
        paying = [m for m in MODE_OF if m in summary and makes_the_edit(summary, m)
                  and (summary[m]["unedited_psnr"] or 0.0) >= sdedit_psnr + psnr_margin]
        if paying:
            method = max(paying, key=lambda m: summary[m]["unedited_psnr"])
            mode = MODE_OF[method]
        elif makes_the_edit(summary, "sdedit"):
            mode, method = "sdedit", "sdedit"
        else:
            mode, method = "fresh", "fresh"
        chosen[kind] = {"mode": mode, "method": method, "edits": summary["edits"],
                        "unedited_psnr": summary[method]["unedited_psnr"],
                        "edited_right": summary[method]["edited_right"]}
    return chosen


def write_auto_modes(result: dict, path: str | Path | None = None) -> Path:
    """Store `choose_modes(result)` where `auto_mode` reads it (default: the shipped table)."""
    from .rounds import AUTO_MODES_PATH

    path = Path(path or AUTO_MODES_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"by_kind": choose_modes(result), "model": result.get("model", {}).get("pair"), "side": result["side"],
           "split": result.get("split"), "steps": result["steps"],
           "source": "diffusionx bench-edits --write-auto-modes"}
    path.write_text(json.dumps(doc, indent=2))
    return path


def _best_controlled(summary: dict) -> str | None:
    """The controlled method measured here that keeps the unedited region best (None: none ran)."""
    scores = {m: summary[m]["unedited_psnr"] or -1.0 for m in CONTROLLED if m in summary}
    return max(scores, key=scores.get) if scores else None


def _bars_met_by(summary: dict) -> list[str]:
    """The controlled methods (and `auto`, the product's per-edit choice) that meet all three bars."""
    return [m for m in (*CONTROLLED, "auto") if m in summary and _meets_bars(summary, m)]


def _meets_bars(summary: dict, method: str) -> bool:
    c = summary[method]
    sd, fresh = summary["sdedit"], summary["fresh"]
    return bool(
        c["unedited_psnr"] is not None and sd["unedited_psnr"] is not None
        and c["unedited_psnr"] >= 25.0 and c["unedited_psnr"] >= sd["unedited_psnr"] + 3.0
        and (c["edited_right"] or 0.0) >= (fresh["edited_right"] or 0.0) - 0.05
        and (c["kept"] or 0.0) >= 0.95
    )


def results_table(result: dict) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["| edit kind | n | method | unedited PSNR dB | unedited SSIM | PSNR dB | SSIM | edited right | kept "
             "| s/edit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, summary in [("all", result["overall"]), *result["by_kind"].items()]:
        if not summary["edits"]:
            lines.append(f"| {kind} | 0 | | | | | | | | |")
            continue
        for method in result.get("methods", METHODS):
            s = summary[method]
            lines.append(
                f"| {kind} | {summary['edits']} | {method} | {cell(s['unedited_psnr'], '.1f')} | "
                f"{cell(s['unedited_ssim'], '.3f')} | {cell(s['psnr'], '.1f')} | {cell(s['ssim'], '.3f')} | "
                f"{cell(s['edited_right'], '.2f')} | {cell(s['kept'], '.3f')} | "
                f"{result['cost'][method]['seconds_per_edit']:.2f} |"
            )
    lines.append("")
    met_by = result.get("bars_met_by") or []
    verdict = f"met by {', '.join(met_by)}" if met_by else f"NOT met (best kept: {result['best_controlled']})"
    lines.append(f"bars ({', '.join(f'{k}: {v}' for k, v in BARS.items())}): {verdict}")
    return "\n".join(lines) + "\n"


def cmd_bench_edits(args) -> int:
    from ..cli.runtime import preview_decoder_arg
    from ..engine import check_seed, check_steps
    from ..errors import InvalidInputError
    from ..models import load_pair

    if args.steps is not None:
        check_steps(args.steps)
    check_seed(args.seed)
    try:
        given = {"cross_steps": args.cross_steps, "self_steps": args.self_steps,
                 "blend_threshold": args.blend_threshold}  # None: the controller's default
        config = ControlConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise InvalidInputError(str(err)) from err
    policy = None
    if args.policy:
        from ..predictors.specs import policy_from_spec

        policy = policy_from_spec(args.policy)
    sessions = None
    if args.sessions:
        from ..bench.run import load_sessions

        sessions, _ = load_sessions(args.sessions, sys.maxsize)
        if not round_edits(1, sessions=sessions):
            raise InvalidInputError(
                f"{args.sessions} has no measurable round edits: the edited objects need a named position "
                "(e.g. 'a red circle on the left' -> 'a blue circle on the left')"
            )
    pair = load_pair(args.model, preview_decoder=preview_decoder_arg(args))
    result = bench_edits(pair, n=args.n, out_dir=args.out, steps=args.steps, seed=args.seed, config=config,
                         policy=policy, side=args.side, sessions=sessions, local_strength=args.local_strength,
                         methods=args.methods, split=args.split,
                         local_free=LOCAL_FREE_STEPS if args.local_free_steps is None else args.local_free_steps)
    print(f"model: {args.side} {getattr(pair, f'{args.side}_info').label}")
    print(results_table(result))
    print(f"wrote {args.out}/edits.json, results.md and edits_grid.png")
    if args.write_auto_modes:
        path = write_auto_modes(result)
        modes = ", ".join(f"{k}: {v['mode']}" for k, v in choose_modes(result).items())
        print(f"auto mode per edit kind ({modes}) written to {path}")
    return 0
