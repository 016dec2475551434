"""`diffusionx bench`: run the methods, score them, write results.json / results.md / plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ..models import ModelPair
from .harness import Method, SessionRecord, calibrate, default_methods, p95, run_method, session_latency
from .profiles import DeviceProfile
from .report import write_markdown, write_plots

MEASURED_VS_MODELLED = {
    "measured": [
        "per-model compute on this machine at batch 1: seconds per U-Net step (with CFG), text encode, VAE "
        "decode; a session's U-Net time is steps x the measured per-step time (extrapolated per step)",
        "U-Net steps each method runs per round (ceil(strength x steps))",
        "bytes on the wire: fp16 safetensors latents (DiffusionX), prompt + PNG per round (cloud-only)",
        "image quality: real generations by the pair's models, scored by the independent evaluator",
    ],
    "modelled": [
        "deployment speed: cloud GPU = this machine x profile.cloud_speedup; edge device = cloud / edge_slowdown",
        "network: profile RTT and bandwidths applied to the measured bytes",
        "cloud queue: 0 (one user, no contention); the load-aware policy models load separately",
        "cloud-only and edge-only rounds before the final: counted in latency and cost, not regenerated "
        "(a fresh generation per round, the same kind as the final one, whose quality is measured)",
    ],
}


# Quality columns when the timed models have random weights (the --arch sd15 mode).
NO_QUALITY = {"clip_score": None, "fid": None, "attribute_accuracy": None, "quality_note": "n/a (random weights)"}


def parse_policy(spec: str, edge_strength: float, oracle_sweeps: list[str] | None = None) -> Method:
    """The benchmark method for a policy spec (the registry: diffusionx.predictors.specs); a fixed
    spec without an edge strength takes `edge_strength`."""
    from ..errors import ModelNotAvailableError
    from ..predictors.specs import policy_from_spec, policy_label

    try:
        policy = policy_from_spec(spec, edge_strength=edge_strength, oracle_sweeps=oracle_sweeps)
    except (ValueError, ModelNotAvailableError) as err:
        raise InvalidInputError(str(err) if repr(spec) in str(err) else f"policy {spec!r}: {err}") from None
    return Method(policy_label(spec, policy), "diffusionx", policy)


def load_sessions(path: str | None, n: int) -> tuple[list[dict], str]:
    """The first `n` sessions of the JSONL file at `path` (default: the embedded world's test
    split). Rounds may be objects with a "prompt" or plain strings (``{"rounds": ["a circle",
    "a red circle"]}``); every round comes back as {"prompt", "scene", "edit"}, a missing scene
    read from the prompt by `world.parse_prompt` (None outside the world's vocabulary)."""
    from ..world import generate_sessions, read_jsonl
    from ..world.sessions import normalize_session

    if n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {n}")
    if path is None:
        return generate_sessions(n, "test"), "embedded world, test split"
    try:
        raw = read_jsonl(path)[:n]
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidInputError(f"cannot read sessions from {path}: {err}") from None
    sessions = []
    for i, s in enumerate(raw):
        try:
            sessions.append(normalize_session(s, i))
        except ValueError as err:
            raise InvalidInputError(f"{path}: session {i}: {err}") from None
    if not sessions:
        raise InvalidInputError(f"{path} holds no sessions")
    # a file the world wrote names its split in every session; say it, since the path may not last
    splits = {s.get("split") for s in raw}
    if len(splits) == 1 and splits <= {"train", "validation", "test"}:
        return sessions, f"{path}: embedded world, {splits.pop()} split"
    return sessions, str(path)


def write_calibration(pair: ModelPair, path: str | Path, repeats: int = 15) -> dict[str, Any]:
    """Measure the pair's compute times on this machine and save them for `run_bench(calibration=)`."""
    calib = {**calibrate(pair, repeats=repeats), "models": pair.describe(), "machine": _machine(pair)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(calib, indent=2))
    return calib


def _machine(pair: ModelPair) -> str:
    """Where a calibration was measured: the GPU's name and dtype, or the CPU."""
    import platform

    import torch

    device, dtype = pair.cloud.device, str(pair.cloud.dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {dtype}"
    return f"this machine's CPU ({platform.machine()}, {torch.get_num_threads()} threads), {dtype}"


def read_calibration(path: str | Path) -> dict[str, Any]:
    try:
        calib = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidInputError(f"cannot read calibration {path}: {err}") from None
    keys = {"unet_step_s", "text_encode_s", "decode_s"}
    if not all(isinstance(calib.get(role), dict) and keys <= set(calib[role]) for role in ("edge", "cloud")):
        raise InvalidInputError(f"{path}: needs 'edge' and 'cloud' objects with {sorted(keys)}")
    return calib


def _quality(evaluator, images: list, prompts: list[str], references: list | None) -> dict[str, Any]:
    scores = evaluator.clip_score(images, prompts)
    attributes = evaluator.attribute_accuracy(images, prompts)
    return {
        "clip_score": float(np.mean(scores)),
        "clip_score_per_image": [float(x) for x in scores],
        "fid": float(evaluator.fid(images, references)) if references is not None else None,
        "attribute_accuracy": attributes["mean"],
        "attribute_accuracy_per_image": attributes["per_image"],
        "n_unparseable": attributes["n_unparseable"],
    }


def paired_ratio_ci95(values: list, baseline: list, resamples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """mean(values) / mean(baseline) over the items both score, with a 95% percentile interval
    from resampling the items (pairs stay together, so what both share cancels)."""
    pairs = np.array([(v, b) for v, b in zip(values, baseline) if v is not None and b is not None], dtype=float)
    if len(pairs) < 2 or pairs[:, 1].mean() == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    sums = pairs[picks].sum(axis=1)  # (resamples, 2)
    ratios = sums[:, 0] / np.where(sums[:, 1] == 0, np.nan, sums[:, 1])
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return {"ratio": float(pairs[:, 0].mean() / pairs[:, 1].mean()), "ci95": [float(low), float(high)],
            "n": len(pairs)}


def _edge_steps(method: Method, records: list) -> float:
    if method.kind == "cloud-only":
        return 0.0
    return float(np.mean([sum(r["unet_steps"] for r in record.rounds) for record in records]))


def _mean_scored(values: list) -> float | None:
    scored = [v for v in values if v is not None]  # None: an unparseable prompt, not scored
    return float(np.mean(scored)) if scored else None


def _preview_quality(evaluator, sessions: list[dict], records: list, edited: bool) -> tuple[dict, dict[str, Any]]:
    """Attribute accuracy of every preview, read once: its mean per round, and (with `edited`) the
    quality of the previews of rounds 2+, the ones a policy's edge strength decides (round 1 is
    always a fresh generation), to compare with a from-scratch method (edge strength 1, `fixed-1-C`).
    Their per-image values are kept, keyed by (session, round), so two methods can be compared pair
    by pair."""
    items = [
        (i, index, image, session["rounds"][index - 1]["prompt"])
        for i, (session, record) in enumerate(zip(sessions, records))
        for index, image in record.previews
    ]
    if evaluator is None or not items:
        return {}, {}
    accuracy = evaluator.attribute_accuracy([it[2] for it in items], [it[3] for it in items])["per_image"]
    by_round: dict[int, list] = {}
    for it, acc in zip(items, accuracy):
        by_round.setdefault(it[1], []).append(acc)
    per_round = {index: _mean_scored(values) for index, values in sorted(by_round.items())}
    later = [(it, acc) for it, acc in zip(items, accuracy) if it[1] > 1]
    if not edited or not later:
        return per_round, {}
    scores = evaluator.clip_score([it[2] for it, _ in later], [it[3] for it, _ in later])
    return per_round, {
        "edited_preview_attribute_accuracy": _mean_scored([acc for _, acc in later]),
        "edited_preview_clip_score": float(np.mean(scores)),
        "edited_previews": len(later),
        "edited_preview_per_image": {
            "session": [it[0] for it, _ in later],
            "round": [it[1] for it, _ in later],
            "attribute_accuracy": [acc for _, acc in later],
            "clip_score": [float(x) for x in scores],
        },
    }


def _fidelity(evaluator, sessions: list[dict], records: list) -> dict[str, Any]:
    """Is the final still the image the user approved? Per session, between the last preview and
    the final: PSNR and SSIM, the cosine distance of the evaluator's image features, and
    *attributes kept* (of the named attributes the preview rendered right, the share the final
    still renders right). Means with 95% intervals; per-session values under "per_session"."""
    from ..metrics.evaluator import attributes_kept
    from ..metrics.image import mean_ci95, psnr, ssim

    previews = [record.previews[-1][1] for record in records]
    finals = [record.final_image for record in records]
    prompts = [s["rounds"][-1]["prompt"] for s in sessions]
    per: dict[str, list] = {
        "psnr_db": [psnr(a, b) for a, b in zip(previews, finals)],
        "ssim": [ssim(a, b) for a, b in zip(previews, finals)],
    }
    if evaluator is not None:
        feats = evaluator.image_features(previews + finals)
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        n = len(previews)
        per["feature_distance"] = [float(1.0 - feats[i] @ feats[n + i]) for i in range(n)]
        checks = evaluator.attribute_accuracy(previews + finals, prompts + prompts)["results"]
        per["attributes_kept"] = [attributes_kept(checks[i], checks[n + i]) for i in range(n)]
    out: dict[str, Any] = {}
    for key, values in per.items():
        mean, ci = mean_ci95(values)
        out[key], out[f"{key}_ci95"] = mean, ci
    out["per_session"] = per
    return out


REFERENCE_SEED = 14  # the unnamed attributes of partial final prompts' FID references


def _references(sessions: list[dict]) -> list | None:
    """FID reference images: a render of each session's final scene. A partial scene (a prompt
    that leaves attributes unsaid) is completed with the unnamed attributes drawn at random,
    from a fixed seed per session, so every method is compared with the same references. None
    (no FID) when a final round has no scene (a prompt outside the world's vocabulary)."""
    from ..world import Scene, render
    from ..world.scene import complete

    finals = [s["rounds"][-1].get("scene") for s in sessions]
    if any(scene is None for scene in finals):
        return None  # FID needs reference renders: only sessions with scene graphs have them
    return [
        render(complete(Scene.from_dict(scene), np.random.default_rng([REFERENCE_SEED, i])))
        for i, scene in enumerate(finals)
    ]


def run_bench(
    pair: ModelPair,
    sessions: list[dict],
    methods: list[Method],
    profile: DeviceProfile,
    out: str | Path,
    *,
    workload: str,
    steps: int | None = None,
    guidance_scale: float = 7.5,
    batch: int = 32,
    seed: int = 0,
    calibration: dict[str, Any] | None = None,
    score_quality: bool = True,
) -> dict[str, Any]:
    """`calibration` replaces the compute times measured on `pair` for the latency model, e.g. those
    of the real SD v1.5 / Tiny-SD architectures (`write_calibration` with the random-sd15 preset)."""
    from ..metrics import get_evaluator

    steps = pair.steps_or_default(steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = get_evaluator() if score_quality else None
    started = time.perf_counter()
    calib = calibration or {**calibrate(pair, guidance_scale=guidance_scale), "models": pair.describe()}
    prompts = [s["rounds"][-1]["prompt"] for s in sessions]
    references = _references(sessions)
    results: dict[str, Any] = {}
    finals: dict[str, list] = {}
    for method in tqdm(methods, desc="methods"):
        records = run_method(method, pair, sessions, steps=steps, guidance_scale=guidance_scale, batch=batch, seed=seed)
        latencies = [session_latency(method, r, calib, profile) for r in records]
        finals[method.name] = [r.final_image for r in records]
        preview_quality, edited = _preview_quality(evaluator, sessions, records, method.kind == "diffusionx")
        max_rounds = max(len(lat["round_waits_s"]) for lat in latencies)
        round_waits = [
            float(np.mean([lat["round_waits_s"][k] for lat in latencies if k < len(lat["round_waits_s"])]))
            for k in range(max_rounds)
        ]
        session_s = [lat["session_s"] for lat in latencies]
        results[method.name] = {
            **method.describe(),
            "session_latency_mean_s": float(np.mean(session_s)),
            "session_latency_p95_s": p95(session_s),
            "round_wait_mean_s": round_waits,
            "final_wait_mean_s": float(np.mean([lat["final_wait_s"] for lat in latencies])),
            "cloud_unet_seconds_per_session": float(np.mean([lat["cloud_unet_modelled_s"] for lat in latencies])),
            "cloud_unet_seconds_per_session_measured": float(
                np.mean([lat["cloud_unet_measured_s"] for lat in latencies])
            ),
            "bytes_per_session": float(np.mean([lat["bytes"] for lat in latencies])),
            **(_quality(evaluator, finals[method.name], prompts, references) if evaluator else NO_QUALITY),
            "preview_attribute_accuracy_by_round": preview_quality,
            "edge_unet_steps_per_session": _edge_steps(method, records),
            **edited,
            "preview_fidelity": _fidelity(evaluator, sessions, records) if method.kind == "diffusionx" else None,
        }
        if method.kind == "diffusionx":  # what the policy chose for the finals (a fixed one: its own)
            results[method.name]["cloud_strength_mean"] = float(np.mean([r.final["strength"] for r in records]))
        # What each session ran, so its latency can be modelled again under another calibration or
        # profile without generating anything (`latency_under`).
        results[method.name]["session_work"] = [{"rounds": r.rounds, "final": r.final} for r in records]
    for metric in ("attribute_accuracy", "clip_score"):
        baseline = results.get("cloud-only", {}).get(f"{metric}_per_image")
        for name, result in results.items():
            if baseline is not None and name != "cloud-only" and result.get(f"{metric}_per_image"):
                result[f"{metric}_vs_cloud_only"] = paired_ratio_ci95(result[f"{metric}_per_image"], baseline)
    report = {
        "methods": results,
        "workload": {
            "source": workload,
            "n_sessions": len(sessions),
            "rounds_mean": float(np.mean([len(s["rounds"]) for s in sessions])),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "fid_finals": len(sessions) if references is not None else 0,
        },
        "profile": profile.as_dict(),
        "calibration_measured_s": calib,
        "measured_vs_modelled": MEASURED_VS_MODELLED,
        "models": pair.describe(),
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out / "results.md")
    write_plots(report, finals, prompts, out)
    return report


def latency_under(report: dict[str, Any], calibration: dict[str, Any], profile: DeviceProfile) -> dict[str, float]:
    """Each method's mean session latency (s) in a saved report, modelled again from the work its
    sessions recorded (`session_work`) under `calibration` and `profile`."""
    out = {}
    for name, result in report["methods"].items():
        if "session_work" not in result:
            raise InvalidInputError(f"{name}: the report predates per-session work records; run the benchmark again")
        method = Method(name, result["kind"])
        records = [SessionRecord(rounds=w["rounds"], final=w["final"]) for w in result["session_work"]]
        out[name] = float(np.mean([session_latency(method, r, calibration, profile)["session_s"] for r in records]))
    return out


__all__ = ["default_methods", "latency_under", "load_sessions", "parse_policy", "read_calibration", "run_bench",
           "write_calibration"]
