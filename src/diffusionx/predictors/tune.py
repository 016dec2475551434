"""`diffusionx predictors tune`: the learned policy's strength floors, chosen on validation sessions.

Why floors: the sweep labels are single generations, so a case's measured quality curve is mostly
seed noise; the regressors learn little beyond the mean curve, and their low picks are where
quality is lost (a preview edited at 0.1 from an already drifted latent drifts further; a final
refined at 0.5 keeps the edge model's mistakes). A floor under each direction's predicted
strength bounds that loss while the predictor still raises the strength where it sees a big edit.

How: the benchmark harness runs whole sessions (so compounding over rounds is measured, which the
per-transition sweep rows cannot show) on sessions that are not the test split, in two passes:

1. edge floors, each with the highest cloud floor: keep the one with the lowest mean session
   latency whose previews of rounds 2+ are within `preview_tolerance` (relative, attribute
   accuracy and CLIP score) of regenerating every round from scratch (`fixed-1-1`);
2. cloud floors with that edge floor: keep the fastest whose finals are within `final_tolerance`
   of cloud-only.

Where no candidate meets a target, the highest floor is kept and the report says so. The choice is
written to the predictors' manifest as `policy_defaults`; `LearnedPolicy` uses it when it is not
given floors of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bench.harness import Method, calibrate
from ..policies import FixedStrength
from .policies import MANIFEST, LearnedPolicy, Predictors

SCRATCH = "scratch"  # the method that regenerates every round from noise: the previews' reference


def _name(min_edge: float, min_cloud: float) -> str:
    return f"learned-emin{min_edge:g}-cmin{min_cloud:g}"


def _within(value: float, reference: float, tolerance: float) -> bool:
    return value >= reference * (1.0 - tolerance) - 1e-12


def previews_ok(m: dict[str, Any], scratch: dict[str, Any], tolerance: float) -> bool:
    return all(
        _within(m[k], scratch[k], tolerance)
        for k in ("edited_preview_attribute_accuracy", "edited_preview_clip_score")
    )


def finals_ok(m: dict[str, Any], cloud_only: dict[str, Any], tolerance: float) -> bool:
    return all(_within(m[k], cloud_only[k], tolerance) for k in ("attribute_accuracy", "clip_score"))


def pick(candidates: dict[float, dict[str, Any]], ok) -> tuple[float, bool]:
    """(floor, met): the fastest floor whose results pass `ok`, else the highest floor."""
    passing = [f for f, m in candidates.items() if ok(m)]
    if not passing:
        return max(candidates), False
    return min(passing, key=lambda f: (candidates[f]["session_latency_mean_s"], f)), True


def tune_floors(
    pair,
    sessions: list[dict],
    predictors_dir: str | Path,
    out: str | Path,
    *,
    edge_floors: list[float],
    cloud_floors: list[float],
    preview_tolerance: float = 0.02,
    final_tolerance: float = 0.01,
    profile=None,
    workload: str = "",
    steps: int = 20,
    guidance_scale: float = 7.5,
    batch: int = 32,
    seed: int = 0,
    write: bool = False,
) -> dict[str, Any]:
    from ..bench.profiles import get_profile
    from ..bench.run import run_bench

    if not edge_floors or not cloud_floors:
        raise ValueError("give at least one edge floor and one cloud floor")
    out = Path(out)
    profile = profile or get_profile("laptop-gpu")
    predictors = Predictors.load(predictors_dir, engine=pair.edge)

    def learned(e: float, c: float) -> Method:
        return Method(_name(e, c), "diffusionx", LearnedPolicy(predictors, min_edge=e, min_cloud=c))

    # One calibration for both passes: their latencies are compared with each other.
    calibration = {**calibrate(pair, guidance_scale=guidance_scale), "models": pair.describe()}
    common = {"workload": workload, "steps": steps, "guidance_scale": guidance_scale, "batch": batch, "seed": seed,
              "calibration": calibration}
    top_cloud = max(cloud_floors)
    edge_pass = [
        Method("cloud-only", "cloud-only"),
        Method(SCRATCH, "diffusionx", FixedStrength(edge=1.0, cloud=1.0)),
        *(learned(e, top_cloud) for e in sorted(set(edge_floors))),
    ]
    first = run_bench(pair, sessions, edge_pass, profile, out / "edge_floors", **common)["methods"]
    cloud_only, scratch = first["cloud-only"], first[SCRATCH]
    by_edge = {e: first[_name(e, top_cloud)] for e in set(edge_floors)}
    min_edge, previews_met = pick(by_edge, lambda m: previews_ok(m, scratch, preview_tolerance))

    by_cloud = {top_cloud: by_edge[min_edge]}
    rest = [learned(min_edge, c) for c in sorted(set(cloud_floors) - {top_cloud})]
    if rest:
        second = run_bench(pair, sessions, rest, profile, out / "cloud_floors", **common)["methods"]
        by_cloud.update({c: second[_name(min_edge, c)] for c in set(cloud_floors) - {top_cloud}})
    min_cloud, finals_met = pick(by_cloud, lambda m: finals_ok(m, cloud_only, final_tolerance))

    keys = ("session_latency_mean_s", "cloud_unet_seconds_per_session", "edge_unet_steps_per_session",
            "attribute_accuracy", "clip_score", "edited_preview_attribute_accuracy", "edited_preview_clip_score")
    summary = {
        "policy_defaults": {"min_edge": min_edge, "min_cloud": min_cloud},
        "previews_within_tolerance": previews_met,
        "finals_within_tolerance": finals_met,
        "preview_tolerance": preview_tolerance,
        "final_tolerance": final_tolerance,
        "sessions": {"n": len(sessions), "source": workload, "seed": seed},
        "references": {"cloud-only": {k: cloud_only.get(k) for k in keys}, SCRATCH: {k: scratch.get(k) for k in keys}},
        "edge_floors": {str(e): {k: m.get(k) for k in keys} for e, m in sorted(by_edge.items())},
        "cloud_floors": {str(c): {k: m.get(k) for k in keys} for c, m in sorted(by_cloud.items())},
    }
    (out / "tune.json").write_text(json.dumps(summary, indent=1))
    if write:
        path = Path(predictors_dir) / MANIFEST
        manifest = json.loads(path.read_text())
        manifest["policy_defaults"] = {
            "min_edge": min_edge,
            "min_cloud": min_cloud,
            "tuned_on": f"{len(sessions)} sessions ({workload})",
            "preview_tolerance": preview_tolerance,
            "final_tolerance": final_tolerance,
        }
        path.write_text(json.dumps(manifest, indent=1))
    return summary
