"""`diffusionx predictors collect`: quality/cost sweeps over multi-round sessions.

For every session (rounds in lock-step across a chunk of sessions, batched U-Net calls):

- round 1 is a fresh edge generation;
- every later round k is re-generated from round k-1's latent at each strength of the grid
  (strength 1.0 = a fresh generation, the edge reference); each result is scored against p_k;
  the session continues from the result at the oracle label (smallest strength within
  `rollout_eps` of fresh), so later rounds see latents like a good policy would produce; or,
  with a `rollout` policy, from the strength that policy picks (DAgger-style: the rows then show
  the states the policy itself reaches, its own earlier mistakes included);
- the final preview is refined by the cloud model at each strength (1.0 = cloud-only from
  scratch, the cloud reference), after the same fp16 round trip as on the wire.

One JSONL row per edge transition / cloud case with prompts, features, the latent (fp16, base64),
and the full curves (attribute accuracy, evaluator score, U-Net steps, seconds) so labels can be
re-derived for any eps / cost weight. The first line is a header with the settings. Seeds are
fixed per (split, session index); the same seed serves every round of a session (as in the
benchmark). Resumable: sessions already in the file are skipped; rows are appended per chunk.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cloud import CloudRefiner, RefineRequest
from ..engine import steps_for_strength
from ..policies import FixedStrength
from ..session import EdgeSession, advance
from ..wire import latents_from_bytes, latents_to_bytes
from .curves import DEFAULT_EPS, GRID, gap_curve, label, nearest_index, quality
from .features import FeatureExtractor

SPLIT_SEED_OFFSET = {"train": 0, "validation": 100_000, "test": 200_000}
ORACLE_ROLLOUT = "oracle-label"  # the header's `rollout` without a rollout policy (and in older tables)
Scorer = Callable[[list, list[str]], tuple[list[float], list[float]]]


def evaluator_scorer(evaluator: Any = None) -> Scorer:
    """(attribute accuracy per image, evaluator score per image) from the independent evaluator."""
    if evaluator is None:
        from ..metrics import get_evaluator

        evaluator = get_evaluator()

    def score(images: list, prompts: list[str]) -> tuple[list[float], list[float]]:
        attr = evaluator.attribute_accuracy(images, prompts)["per_image"]
        clip = evaluator.clip_score(images, prompts)
        return [0.0 if a is None else float(a) for a in attr], [float(c) for c in clip]

    return score


def encode_latents(latents: torch.Tensor) -> dict[str, Any]:
    x = latents.detach().to(torch.float16).cpu().contiguous()
    return {"shape": list(x.shape), "fp16_b64": base64.b64encode(x.numpy().tobytes()).decode()}


def decode_latents(data: dict[str, Any]) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(data["fp16_b64"]), dtype=np.float16).reshape(data["shape"])
    return torch.from_numpy(raw.astype(np.float32))


def session_seed(seed: int, split: str, index: int) -> int:
    return seed + SPLIT_SEED_OFFSET.get(split, 300_000) + index


def interleave(groups: Sequence[tuple[str, list[dict]]]) -> list[tuple[str, int, dict]]:
    """(split, index, session) work items, splits interleaved in proportion to their sizes."""
    keyed = []
    for split, sessions in groups:
        n = len(sessions)
        keyed.extend(((i + 0.5) / n, split, i, s) for i, s in enumerate(sessions))
    keyed.sort(key=lambda k: k[0])
    return [(split, i, s) for _, split, i, s in keyed]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partly written last line from an interrupted run
    return rows


def collect(
    pair: Any,
    work: list[tuple[str, int, dict]],
    out: str | Path,
    *,
    steps: int | None = None,
    guidance_scale: float = 7.5,
    grid: Sequence[float] = GRID,
    seed: int = 0,
    batch: int = 64,
    chunk: int = 4,
    rollout_eps: float = DEFAULT_EPS,
    time_budget_s: float | None = None,
    scorer: Scorer | None = None,
    features: FeatureExtractor | None = None,
    progress: bool = True,
    directions: str = "both",
    previews: list[dict] | None = None,
    rollout: Any = None,
    rollout_name: str | None = None,
) -> dict[str, Any]:
    """Run the sweeps for `work` (see `interleave`), appending rows to `out`. Returns a summary.

    directions: "both"; "edge" (edge sweeps and each session's final preview as a
    `final_preview` row; `pair.cloud` is not used); or "cloud" (cloud sweeps of `previews`, the
    `final_preview` rows of an edge run; `work` is not used).
    rollout: a `StrengthPolicy` whose edge choice each session continues from (None: the oracle
    label at `rollout_eps`); `rollout_name` is what the header records for it."""
    steps = pair.steps_or_default(steps)
    if directions not in ("both", "edge", "cloud"):
        raise ValueError(f"directions must be both, edge or cloud, not {directions!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = [float(s) for s in grid]
    if grid[-1] != 1.0:
        raise ValueError("the strength grid must end at 1.0 (the reference)")
    features = features or FeatureExtractor.from_engine(pair.edge)
    header = {
        "kind": "header",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "grid": grid,
        "seed": seed,
        "rollout_eps": rollout_eps,
        "rollout": rollout_name or (ORACLE_ROLLOUT if rollout is None else type(rollout).__name__),
        "directions": directions,
        "models": pair.describe(),
        "feature_names": {"edge": features.edge_names(), "cloud": features.cloud_names()},
    }
    existing = read_rows(out)
    if existing:
        old = existing[0]
        for key in ("steps", "guidance_scale", "grid", "seed", "rollout"):
            if old.get(key, ORACLE_ROLLOUT if key == "rollout" else None) != header[key]:
                raise ValueError(
                    f"{out} was collected with {key}={old.get(key)!r}, not {header[key]!r}: "
                    "use another --out or the same settings to resume"
                )
        with out.open("r+b") as f:  # drop a partly written last line before appending
            data = f.read()
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
    else:
        out.write_text(json.dumps(header) + "\n")
    marker = "final_preview" if directions == "edge" else "cloud"
    done = {(r["split"], r["session"]) for r in existing if r.get("kind") == marker}
    if directions == "cloud":
        todo: list[Any] = [p for p in previews or [] if (p["split"], p["session"]) not in done]
    else:
        todo = [w for w in work if (w[0], w[1]) not in done]
    scorer = scorer or evaluator_scorer()
    kwargs = dict(steps=steps, guidance=guidance_scale, grid=grid, batch=batch, scorer=scorer, features=features)
    started = time.perf_counter()
    n_done, chunk_s, stopped = 0, 0.0, False
    bar = tqdm(total=len(todo), desc=f"collect ({directions})", disable=not progress)
    for start in range(0, len(todo), chunk):
        elapsed = time.perf_counter() - started
        if time_budget_s is not None and n_done and elapsed + chunk_s > time_budget_s:
            stopped = True
            break
        t0 = time.perf_counter()
        part = todo[start : start + chunk]
        if directions == "cloud":
            rows = _cloud_chunk(pair, part, **kwargs)
        else:
            rows, final = _edge_chunk(pair, part, seed=seed, rollout_eps=rollout_eps, rollout=rollout, **kwargs)
            rows += final
            if directions == "both":
                rows += _cloud_chunk(pair, final, **kwargs)
        with out.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        chunk_s = time.perf_counter() - t0
        n_done += len(part)
        bar.update(len(part))
    bar.close()
    rows = read_rows(out)
    return {
        "out": str(out),
        "directions": directions,
        "sessions_this_run": n_done,
        "sessions_total": sum(1 for r in rows if r.get("kind") == marker),
        "edge_rows": sum(1 for r in rows if r.get("kind") == "edge"),
        "cloud_rows": sum(1 for r in rows if r.get("kind") == "cloud"),
        "stopped_by_time_budget": stopped,
        "remaining": len(todo) - n_done,
        "wall_s": time.perf_counter() - started,
    }


def previews_from(paths: Sequence[str | Path]) -> list[dict]:
    """The `final_preview` rows of edge-direction tables (the cloud direction's inputs)."""
    return [r for path in paths for r in read_rows(path) if r.get("kind") == "final_preview"]


def _edge_chunk(pair, work, *, steps, guidance, grid, seed, batch, rollout_eps, rollout, scorer, features):
    """Edge sweeps of a chunk of sessions: (edge rows, final_preview rows). Each session is a real
    EdgeSession: every grid strength is planned from its head, all plans of the chunk render in
    shared U-Net calls, and the session commits the one it continues from."""
    n = len(work)
    seeds = [session_seed(seed, split, i) for split, i, _ in work]
    rounds = [s["rounds"] for _, _, s in work]
    live = [EdgeSession(pair, policy=FixedStrength(), steps=steps, guidance_scale=guidance, seed=sd) for sd in seeds]
    scores: list[tuple[float, float]] = [(0.0, 0.0)] * n  # the head round's (attribute accuracy, score)
    rows: list[dict] = []
    step_counts = [steps_for_strength(s, steps) for s in grid]
    engine = pair.edge
    for r in range(max(len(x) for x in rounds)):
        active = [i for i in range(n) if r < len(rounds[i])]
        prompts = [rounds[i][r]["prompt"] for i in active]
        if r == 0:
            firsts = advance([live[i] for i in active], prompts, batch=batch, desc="round 1")
            attr, clip = scorer([f.image for f in firsts], prompts)
            for k, i in enumerate(active):
                scores[i] = (attr[k], clip[k])
            continue
        plans = [live[i].plan(prompt, strength=s) for i, prompt in zip(active, prompts) for s in grid]
        start = time.perf_counter()
        engine.run([p.job for p in plans], desc=f"edge round {r + 1}", batch=batch)
        generations = engine.finish_all([p.job for p in plans])
        per_step = (time.perf_counter() - start) / (sum(p.job.num_steps for p in plans) or 1)
        attr, clip = scorer([g.image for g in generations], [p.prompt for p in plans])
        g = len(grid)
        for k, (i, prompt) in enumerate(zip(active, prompts)):
            a, c = attr[k * g : (k + 1) * g], clip[k * g : (k + 1) * g]
            head = live[i].current
            if rollout is None:
                chosen = grid.index(label(gap_curve(quality(a, c)), rollout_eps, grid))
            else:  # the grid strength nearest to the policy's choice
                chosen = nearest_index(rollout.edge_strength(head.prompt, prompt, head.latents), grid)
            split, index, _ = work[i]
            rows.append(
                {
                    "kind": "edge",
                    "split": split,
                    "session": index,
                    "round": r + 1,
                    "seed": seeds[i],
                    "rollout_strength": grid[chosen],
                    "edit": rounds[i][r].get("edit"),
                    "previous_prompt": head.prompt,
                    "prompt": prompt,
                    "strengths": grid,
                    "attribute_accuracy": a,
                    "clip_score": c,
                    "unet_steps": step_counts,
                    "seconds": [per_step * cnt for cnt in step_counts],
                    "features": features.edge(head.prompt, prompt, head.latents).tolist(),
                    "previous_latents": encode_latents(head.latents),
                }
            )
            live[i].commit(plans[k * g + chosen], generations[k * g + chosen])
            scores[i] = (a[chosen], c[chosen])
    previews = []
    for i in range(n):
        split, index, _ = work[i]
        head = live[i].current
        previews.append(
            {
                "kind": "final_preview",
                "split": split,
                "session": index,
                "round": len(rounds[i]),
                "seed": seeds[i],
                "prompt": head.prompt,
                "attribute_accuracy": scores[i][0],
                "clip_score": scores[i][1],
                "latents": encode_latents(head.latents),
            }
        )
    return rows, previews


def _cloud_chunk(pair, previews, *, steps, guidance, grid, batch, scorer, features) -> list[dict]:
    """The cloud refines each final preview (fp16, as it crosses the wire) at every grid strength,
    through the in-process refiner's contract, `batch` refinements per U-Net call."""
    requests = [
        RefineRequest(prompt=p["prompt"], strength=s, steps=steps, seed=p["seed"], guidance_scale=guidance,
                      latents=latents_to_bytes(decode_latents(p["latents"])))
        for p in previews for s in grid
    ]
    start = time.perf_counter()
    results = CloudRefiner(pair.cloud).refine_all(requests, batch=batch)
    per_step = (time.perf_counter() - start) / (sum(r.unet_steps for r in results) or 1)
    finals = [latents_from_bytes(r.payload) for r in results]
    images = [img for k in range(0, len(finals), 64) for img in pair.edge.decode(torch.cat(finals[k : k + 64]))]
    attr, clip = scorer(images, [r.prompt for r in requests])
    g = len(grid)
    step_counts = [steps_for_strength(s, steps) for s in grid]
    rows = []
    for i, p in enumerate(previews):
        rows.append(
            {
                "kind": "cloud",
                "split": p["split"],
                "session": p["session"],
                "round": p["round"],
                "seed": p["seed"],
                "prompt": p["prompt"],
                "strengths": grid,
                "attribute_accuracy": attr[i * g : (i + 1) * g],
                "clip_score": clip[i * g : (i + 1) * g],
                "preview_attribute_accuracy": p["attribute_accuracy"],
                "preview_clip_score": p["clip_score"],
                "unet_steps": step_counts,
                "seconds": [per_step * cnt for cnt in step_counts],
                "features": features.cloud(p["prompt"], decode_latents(p["latents"])).tolist(),
                "latents": p["latents"],
            }
        )
    return rows
