"""`diffusionx evaluate`: final-prompt quality of the edge and the cloud model, side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..models import ModelPair
from .harness import Item, decode_batched, generate_batched
from .report import finals_grid
from .run import _quality, _references


def evaluate_pair(
    pair: ModelPair,
    sessions: list[dict],
    out: str | Path,
    *,
    steps: int = 20,
    guidance_scale: float = 7.5,
    batch: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Generate every session's final prompt with both models (same seeds) and score them."""
    from ..metrics import get_evaluator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = get_evaluator()
    started = time.perf_counter()
    prompts = [s["rounds"][-1]["prompt"] for s in sessions]
    references = _references(sessions)
    items = [Item(prompt, seed + i) for i, prompt in enumerate(prompts)]
    images, report = {}, {}
    for role, engine in (("edge", pair.edge), ("cloud", pair.cloud)):
        latents = generate_batched(engine, items, steps=steps, guidance_scale=guidance_scale, batch=batch, desc=role)
        images[role] = decode_batched(engine, latents)
        report[role] = _quality(evaluator, images[role], prompts, references)
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
    finals_grid(images, prompts, out / "samples.png", columns=10)
    return report
