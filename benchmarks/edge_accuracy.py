"""Attribute accuracy of edge U-Nets, and of the cloud, on the same validation finals and seeds
(numbers, not a test): did a `train pair` run make the edge better, on more prompts than its
64-prompt keep-or-discard check?

    python benchmarks/edge_accuracy.py [--n 384] [--steps 10] [--cloud] EDGE [EDGE ...]

EDGE: `shipped` (the package's edge) or a pipeline folder, e.g. runs/pair6_export/edge.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("edges", nargs="+", metavar="EDGE")
    p.add_argument("--n", type=int, default=384, help="validation sessions; each one's final prompt")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--cloud", action="store_true", help="the shipped cloud on the same prompts too")
    args = p.parse_args(argv)

    from diffusionx.bench.harness import generated_attribute_accuracy
    from diffusionx.models import load_pair
    from diffusionx.world import generate_sessions

    prompts = [s["rounds"][-1]["prompt"] for s in generate_sessions(args.n, "validation")]
    runs = [(edge, "edge") for edge in args.edges] + ([("shipped", "cloud")] if args.cloud else [])
    for source, role in runs:
        pair = load_pair(edge=None if source == "shipped" else source, preview_decoder=None)
        accuracy = generated_attribute_accuracy(getattr(pair, role), prompts, steps=args.steps, seed=1000,
                                                guidance_scale=args.guidance, desc=f"{role} {source}")["mean"]
        print(json.dumps({"role": role, "model": source, "n": args.n, "steps": args.steps,
                          "attribute_accuracy": round(accuracy, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
