"""`diffusionx predictors tune`: the learned policy's edge tolerance and strength floors, chosen on
validation sessions.

Why: the policy's knobs trade steps for quality, and how much quality a choice costs shows only
over whole sessions (a preview edited at 0.1 from an already drifted latent drifts further; a
final refined at 0.5 keeps the edge model's mistakes). The edge predictor's tolerance (eps) sets
how close to a fresh generation each predicted choice aims; a floor under each direction's
predicted strength bounds the loss where the predictor is wrong (with predictors trained on
oracle rollouts, which never see their own drift, the floor did most of the work).

How: the benchmark harness runs whole sessions (so compounding over rounds is measured, which the
per-transition sweep rows cannot show) on sessions that are not the test split, in two passes:

1. edge settings (every edge eps with every edge floor), each with the highest cloud floor: keep
   the one with the lowest mean session latency whose previews of rounds 2+ are within
   `preview_tolerance` (relative, attribute accuracy and CLIP score) of regenerating every round
   from scratch (`fixed-1-1`);
2. cloud floors with that edge setting: keep the fastest whose finals are within
   `final_tolerance` of cloud-only and still the image the user approved: PSNR(last preview,
   final) of at least `fidelity_floor` dB (the benchmark's preview fidelity; 0 = no floor).

Where no candidate meets a target, the safest one is kept and the report says so: for the edge,
the highest floor, then the smallest eps; for the cloud, the highest floor whose finals still
keep the fidelity floor (the floor only acts in refine mode, and a refinement that regenerates
the preview is not one), the highest of all only where none keeps it. The choice is written to
the predictors' manifest as `policy_defaults`; `LearnedPolicy` uses it for whatever it is not
given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bench.harness import Method, calibrate
from ..policies import FixedStrength
from .curves import DEFAULT_EPS
from .policies import MANIFEST, LearnedPolicy, Predictors

SCRATCH = "scratch"  # the method that regenerates every round from noise: the previews' reference


def _name(edge_eps: float, min_edge: float, min_cloud: float) -> str:
    return f"learned-eeps{edge_eps:g}-emin{min_edge:g}-cmin{min_cloud:g}"


def _within(value: float, reference: float, tolerance: float) -> bool:
    return value >= reference * (1.0 - tolerance) - 1e-12


def previews_ok(m: dict[str, Any], scratch: dict[str, Any], tolerance: float) -> bool:
    return all(
        _within(m[k], scratch[k], tolerance)
        for k in ("edited_preview_attribute_accuracy", "edited_preview_clip_score")
    )


def keeps_preview(m: dict[str, Any], fidelity_floor: float) -> bool:
    psnr = (m.get("preview_fidelity") or {}).get("psnr_db")
    return not fidelity_floor or (psnr is not None and psnr >= fidelity_floor)


def finals_ok(m: dict[str, Any], cloud_only: dict[str, Any], tolerance: float, fidelity_floor: float = 0.0) -> bool:
    quality = all(_within(m[k], cloud_only[k], tolerance) for k in ("attribute_accuracy", "clip_score"))
    return quality and keeps_preview(m, fidelity_floor)


def pick(candidates: dict[Any, dict[str, Any]], ok, safest=max) -> tuple[Any, bool]:
    """(key, met): the fastest candidate whose results pass `ok`, else `safest(keys)`."""
    passing = [f for f, m in candidates.items() if ok(m)]
    if not passing:
        return safest(candidates), False
    return min(passing, key=lambda f: (candidates[f]["session_latency_mean_s"], f)), True


def _safest_edge(keys):
    return max(keys, key=lambda k: (k[1], -k[0]))  # (eps, floor): highest floor, then smallest eps


def safest_cloud(by_cloud: dict[float, dict[str, Any]], fidelity_floor: float) -> float:
    """The highest cloud floor whose finals keep the fidelity floor; the highest of all if none does."""
    keeping = [c for c, m in by_cloud.items() if keeps_preview(m, fidelity_floor)]
    return max(keeping or by_cloud)


def tune_policy(
    pair,
    sessions: list[dict],
    predictors_dir: str | Path,
    out: str | Path,
    *,
    edge_floors: list[float],
    cloud_floors: list[float],
    edge_eps: list[float] = (DEFAULT_EPS,),
    preview_tolerance: float = 0.02,
    final_tolerance: float = 0.01,
    fidelity_floor: float = 0.0,
    profile=None,
    workload: str = "",
    steps: int | None = None,
    guidance_scale: float = 7.5,
    batch: int = 32,
    seed: int = 0,
    write: bool = False,
) -> dict[str, Any]:
    from ..bench.profiles import get_profile
    from ..bench.run import run_bench

    if not edge_floors or not cloud_floors or not edge_eps:
        raise ValueError("give at least one edge eps, one edge floor and one cloud floor")
    steps = pair.steps_or_default(steps)
    out = Path(out)
    profile = profile or get_profile("laptop-gpu")
    predictors = Predictors.load(predictors_dir, engine=pair.edge)

    def learned(eps: float, e: float, c: float) -> Method:
        policy = LearnedPolicy(predictors, edge_eps=eps, min_edge=e, min_cloud=c)
        return Method(_name(eps, e, c), "diffusionx", policy)

    # One calibration for both passes: their latencies are compared with each other.
    calibration = {**calibrate(pair, guidance_scale=guidance_scale), "models": pair.describe()}
    common = {"workload": workload, "steps": steps, "guidance_scale": guidance_scale, "batch": batch, "seed": seed,
              "calibration": calibration}
    top_cloud = max(cloud_floors)
    settings = sorted({(float(eps), float(e)) for eps in edge_eps for e in edge_floors})
    edge_pass = [
        Method("cloud-only", "cloud-only"),
        Method(SCRATCH, "diffusionx", FixedStrength(edge=1.0, cloud=1.0)),
        *(learned(eps, e, top_cloud) for eps, e in settings),
    ]
    first = run_bench(pair, sessions, edge_pass, profile, out / "edge_settings", **common)["methods"]
    cloud_only, scratch = first["cloud-only"], first[SCRATCH]
    by_edge = {(eps, e): first[_name(eps, e, top_cloud)] for eps, e in settings}
    (eps, min_edge), previews_met = pick(
        by_edge, lambda m: previews_ok(m, scratch, preview_tolerance), safest=_safest_edge
    )

    by_cloud = {top_cloud: by_edge[eps, min_edge]}
    rest = [learned(eps, min_edge, c) for c in sorted(set(cloud_floors) - {top_cloud})]
    if rest:
        second = run_bench(pair, sessions, rest, profile, out / "cloud_floors", **common)["methods"]
        by_cloud.update({c: second[_name(eps, min_edge, c)] for c in set(cloud_floors) - {top_cloud}})
    min_cloud, finals_met = pick(by_cloud, lambda m: finals_ok(m, cloud_only, final_tolerance, fidelity_floor),
                                 safest=lambda candidates: safest_cloud(candidates, fidelity_floor))

    keys = ("session_latency_mean_s", "cloud_unet_seconds_per_session", "edge_unet_steps_per_session",
            "attribute_accuracy", "clip_score", "edited_preview_attribute_accuracy", "edited_preview_clip_score")
    summary = {
        "policy_defaults": {"edge_eps": eps, "min_edge": min_edge, "min_cloud": min_cloud},
        "previews_within_tolerance": previews_met,
        "finals_within_tolerance": finals_met,
        "preview_tolerance": preview_tolerance,
        "final_tolerance": final_tolerance,
        "fidelity_floor_db": fidelity_floor,
        "sessions": {"n": len(sessions), "source": workload, "seed": seed, "steps": steps},
        "references": {"cloud-only": {k: cloud_only.get(k) for k in keys}, SCRATCH: {k: scratch.get(k) for k in keys}},
        "edge_settings": [
            {"edge_eps": e, "min_edge": f, **{k: m.get(k) for k in keys}} for (e, f), m in sorted(by_edge.items())
        ],
        "cloud_floors": {str(c): {**{k: m.get(k) for k in keys},
                                  "preview_psnr_db": (m.get("preview_fidelity") or {}).get("psnr_db")}
                         for c, m in sorted(by_cloud.items())},
    }
    (out / "tune.json").write_text(json.dumps(summary, indent=1))
    if write:
        path = Path(predictors_dir) / MANIFEST
        manifest = json.loads(path.read_text())
        manifest["policy_defaults"] = {
            "edge_eps": eps,
            "min_edge": min_edge,
            "min_cloud": min_cloud,
            "tuned_on": f"{len(sessions)} sessions ({workload}), {steps} steps",
            "preview_tolerance": preview_tolerance,
            "final_tolerance": final_tolerance,
            "fidelity_floor_db": fidelity_floor,
        }
        path.write_text(json.dumps(manifest, indent=1))
    return summary
