"""The cloud refining stored final previews under other sampler settings (numbers, not a test):
does a guidance scale or a step count let a refinement at a given strength reach more of
cloud-only's attribute accuracy?

    python benchmarks/refine_settings.py ROWS.jsonl [--strengths 0.5,1.0] [--configs 7.5:10,5:10,7.5:20] [--draws 2]

ROWS.jsonl: a cloud sweep table of `diffusionx predictors collect` (its rows store each final
preview's latent; collect's train and validation splits, never test). Strength 1 ignores the
preview: it is cloud-only. Each draw refines every preview with its own noise (row seed +
--seed-offset + 1000 x draw), so the spread between draws is the sampling noise of the mean.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", help="cloud sweep table (predictors collect --directions cloud)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--strengths", default="0.5,1.0")
    p.add_argument("--configs", default="7.5:10,5:10,10:10,7.5:20", help="guidance:steps,...")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--seed-offset", type=int, default=0, help="added to every row's seed (another set of draws)")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",")]
    configs = [(float(g), int(n)) for g, n in (c.split(":") for c in args.configs.split(","))]

    import numpy as np

    from diffusionx.metrics.evaluator import get_evaluator
    from diffusionx.models import load_pair
    from diffusionx.predictors.collect import decode_latents, read_rows

    rows = [r for r in read_rows(args.rows) if r.get("kind") == "cloud"]
    prompts = [r["prompt"] for r in rows]
    previews = [decode_latents(r["latents"]) for r in rows]
    cloud, evaluator = load_pair(args.model, preview_decoder=None).cloud, get_evaluator()
    print(f"{len(rows)} final previews ({args.rows}); model pair {args.model}, cloud side")
    print(f"{'strength':>8} {'guidance':>8} {'steps':>5} {'attribute acc. per draw':>24} {'mean':>6} {'CLIP':>6}")
    for strength in strengths:
        for guidance, steps in configs:
            accuracy, clip = [], []
            for draw in range(args.draws):
                shift = args.seed_offset + 1000 * draw  # this draw's noise
                jobs = [cloud.prepare(prompt, seed=row["seed"] + shift, steps=steps, strength=strength,
                                      init_latents=latents, guidance_scale=guidance)
                        for prompt, row, latents in zip(prompts, rows, previews)]
                cloud.run(jobs, batch=args.batch)
                images = [g.image for g in cloud.finish_all(jobs, decode=True)]
                accuracy.append(evaluator.attribute_accuracy(images, prompts)["mean"])
                clip.append(float(evaluator.clip_score(images, prompts).mean()))
            draws = " ".join(f"{a:.4f}" for a in accuracy)
            print(f"{strength:>8.2f} {guidance:>8g} {steps:>5} {draws:>24} {np.mean(accuracy):>6.4f} "
                  f"{np.mean(clip):>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
