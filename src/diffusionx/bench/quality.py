"""`diffusionx evaluate`: final-prompt quality of the edge and the cloud model, side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..models import ModelPair
from .harness import Item, decode_batched, generate_batched
from .report import finals_grid
from .run import _quality, _references


def attribute_details(evaluator, images: list, prompts: list[str]) -> dict[str, Any]:
    """Per-check accuracy overall and by the number of objects a prompt names, and the share of
    images whose object and background colors are swapped ("a red circle on a blue background"
    rendered as a blue circle on red): the named background color appears on a detected object
    while the named color of an object is read as the background."""
    from ..metrics.evaluator import aggregate_checks, score_scene
    from ..world import parse_prompt

    predictions = evaluator.predict_attributes(images)
    by_count: dict[int, list[dict]] = {}
    swaps = swap_candidates = 0
    for prediction, prompt in zip(predictions, prompts):
        scene = parse_prompt(prompt)
        if scene is None:
            continue
        by_count.setdefault(len(scene.objects), []).append(score_scene(prediction, scene))
        named_colors = {o.color for o in scene.objects if o.color is not None}
        if scene.background is None or not named_colors:
            continue
        swap_candidates += 1
        detected = {o["color"] for o in prediction["objects"].values()}
        swaps += prediction["background"] in named_colors and scene.background in detected

    everything = [r for results in by_count.values() for r in results]
    counts = {n: aggregate_checks(results) for n, results in sorted(by_count.items())}
    return {
        "per_attribute": aggregate_checks(everything)["per_attribute"],
        "by_object_count": {
            str(n): {"n": agg["n_scored"], "attribute_accuracy": agg["mean"], **agg["per_attribute"]}
            for n, agg in counts.items()
        },
        "color_swap_rate": swaps / swap_candidates if swap_candidates else None,
        "color_swap_images": swap_candidates,
    }


def evaluate_pair(
    pair: ModelPair,
    sessions: list[dict],
    out: str | Path,
    *,
    steps: int | None = None,
    guidance_scale: float = 7.5,
    batch: int = 32,
    seed: int = 0,
    refine_strengths: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Generate every session's final prompt with both models (same seeds) and score them.

    With `refine_strengths`, the cloud also refines each edge image (same prompt and seed) at
    each strength: does refinement keep the preview (PSNR preview -> final) and reach the cloud's
    own quality (attribute accuracy and FID relative to the cloud from noise)?"""
    from ..metrics import get_evaluator

    steps = pair.steps_or_default(steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = get_evaluator()
    started = time.perf_counter()
    prompts = [s["rounds"][-1]["prompt"] for s in sessions]
    references = _references(sessions)
    items = [Item(prompt, seed + i) for i, prompt in enumerate(prompts)]
    images, report, latents = {}, {}, {}
    for role, engine in (("edge", pair.edge), ("cloud", pair.cloud)):
        latents[role] = generate_batched(engine, items, steps=steps, guidance_scale=guidance_scale, batch=batch,
                                         desc=role)
        images[role] = decode_batched(engine, latents[role])
        report[role] = {**_quality(evaluator, images[role], prompts, references),
                        **attribute_details(evaluator, images[role], prompts)}
    refined = {}
    for strength in refine_strengths:
        refine_items = [Item(it.prompt, it.seed, strength, z) for it, z in zip(items, latents["edge"])]
        out_latents = generate_batched(pair.cloud, refine_items, steps=steps, guidance_scale=guidance_scale,
                                       batch=batch, desc=f"refine {strength:g}")
        finals = decode_batched(pair.cloud, out_latents)
        refined[f"refined {strength:g}"] = finals
        quality = _quality(evaluator, finals, prompts, references)
        cloud = report["cloud"]
        quality.update(
            strength=strength,
            psnr_preview_final_db=mean_psnr(images["edge"], finals),
            attribute_accuracy_vs_cloud=_ratio(quality["attribute_accuracy"], cloud["attribute_accuracy"]),
            fid_vs_cloud=_ratio(quality["fid"], cloud["fid"]),
        )
        report.setdefault("refinement", []).append(quality)
    report["settings"] = {
        "n_prompts": len(prompts),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "scheduler": "ddim",
        "fid_reference": "renders of the final prompts' scene graphs" if references is not None else None,
    }
    report["models"] = pair.describe()
    report["wall_seconds"] = time.perf_counter() - started
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    finals_grid({**images, **refined}, prompts, out / "samples.png", columns=10)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def mean_psnr(images_a: list, images_b: list) -> float:
    """Mean over pairs of the PSNR (dB, uint8 scale) between two images; identical pairs count 100 dB."""
    values = []
    for a, b in zip(images_a, images_b):
        x = np.asarray(a, dtype=np.float64)
        y = np.asarray(b, dtype=np.float64)
        mse = float(np.mean((x - y) ** 2))
        values.append(100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))
