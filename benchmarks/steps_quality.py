"""Attribute accuracy of each model's fresh generations by sampler and step count (numbers, not a
test): how many steps the embedded pair needs, which sets the step count a benchmark runs at.

    python benchmarks/steps_quality.py [--n 128] [--configs ddim:20,ddim:10,dpm++:10,dpm++:8,euler:10]

The final prompts of the first N test sessions, seed i for prompt i, scored by the independent
evaluator (the same attribute accuracy `diffusionx bench` reports).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n", type=int, default=128, help="test sessions (their final prompts)")
    p.add_argument("--configs", default="ddim:20,ddim:10,dpm++:10,dpm++:8,euler:10", help="scheduler:steps,...")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    configs = [(name, int(steps)) for name, steps in (c.split(":") for c in args.configs.split(","))]

    from diffusionx.bench.run import load_sessions
    from diffusionx.metrics.evaluator import get_evaluator
    from diffusionx.models import load_pair

    sessions, source = load_sessions(None, args.n)
    prompts = [s["rounds"][-1]["prompt"] for s in sessions]
    pair, evaluator = load_pair(args.model), get_evaluator()
    print(f"{len(prompts)} final prompts ({source}); model pair {args.model}")
    print(f"{'model':<6} {'scheduler':<9} {'steps':>5} {'attribute acc.':>14} {'CLIP score':>10} {'s':>5}")
    for role in ("edge", "cloud"):
        engine = getattr(pair, role)
        for scheduler, steps in configs:
            start = time.perf_counter()
            jobs = [engine.prepare(prompt, seed=i, steps=steps, scheduler=scheduler)
                    for i, prompt in enumerate(prompts)]
            engine.run(jobs, batch=args.batch)
            images = [g.image for g in engine.finish_all(jobs, decode=True)]
            accuracy = evaluator.attribute_accuracy(images, prompts)["mean"]
            clip = float(evaluator.clip_score(images, prompts).mean())
            seconds = time.perf_counter() - start
            print(f"{role:<6} {scheduler:<9} {steps:>5} {accuracy:>14.3f} {clip:>10.2f} {seconds:>5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
