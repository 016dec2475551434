"""DAgger-style edge sweeps on a lent GPU machine (see /work/.library/device and docs/predictors.md).

`predictors collect --rollout-policy SPEC` runs anywhere; this driver runs several of them at once on
one GPU, each continuing its sessions from a different learned policy's edge choice (different
strength floors), so the rows cover the states those policies reach. The GPU image has no
all-MiniLM-L6-v2 weights (88 MB, over what a call can carry), so the sentence-similarity feature
comes from a table computed here beforehand (--similarities: [previous prompt, prompt, cosine]
rows for every consecutive pair of the sessions; the prompts do not depend on the rollout).

    python3 scripts/gpu_dagger_collect.py --similarities outputs/gpu_in/similarities.json --out DIR

Writes DIR/dagger-K.jsonl.gz per worker, without the latents (the features already hold their
statistics) to keep what comes back small.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

FLOORS = (0.5, 0.4, 0.3, 0.0)  # one worker per floor: learned-emin{floor}


class TableSentence:
    """`SentenceEncoder.similarity` from a precomputed table; NaN (counted) for a pair not in it."""

    def __init__(self, path: str) -> None:
        self.table = {(a, b): c for a, b, c in json.loads(Path(path).read_text())}
        self.misses = 0

    def similarity(self, a: str, b: str) -> float:
        value = self.table.get((a, b))
        if value is None:
            self.misses += 1
            return math.nan
        return value


def worker(args) -> None:
    import torch

    from diffusionx.metrics.evaluator import Evaluator
    from diffusionx.models import load_pair
    from diffusionx.predictors.collect import collect, evaluator_scorer, interleave
    from diffusionx.predictors.features import FeatureExtractor
    from diffusionx.predictors.policies import LearnedPolicy, Predictors
    from diffusionx.world import generate_sessions

    torch.set_num_threads(args.threads)
    floor = FLOORS[args.worker]
    sentence = TableSentence(args.similarities)
    pair = load_pair("embedded", device=args.device)
    features = FeatureExtractor.from_engine(pair.edge, sentence)
    predictors = Predictors.load(features=features)  # the pair's own text encoder: loaded once
    policy = LearnedPolicy(predictors, min_edge=floor)
    counts = {"train": args.train, "validation": args.validation}
    groups = [(split, generate_sessions(n, split)) for split, n in counts.items()]
    work = interleave(groups)[args.worker :: len(FLOORS)]
    raw = Path(f"/tmp/dagger-{args.worker}.jsonl")
    summary = collect(
        pair,
        work,
        raw,
        seed=args.seed,
        batch=args.batch,
        chunk=args.chunk,
        time_budget_s=args.minutes * 60,
        scorer=evaluator_scorer(Evaluator.load(device=args.device)),
        features=features,
        progress=False,
        directions="edge",
        rollout=policy,
        rollout_name=f"learned-emin{floor:g}",
    )
    summary["sentence_misses"] = sentence.misses
    print(json.dumps(summary), flush=True)
    with gzip.open(Path(args.out) / f"dagger-{args.worker}.jsonl.gz", "wt") as f:
        for line in raw.read_text().splitlines():
            row = json.loads(line)
            row.pop("previous_latents", None)
            row.pop("latents", None)
            f.write(json.dumps(row) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--similarities", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=6.0, help="each worker's collection budget")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--validation", type=int, default=300)
    p.add_argument("--seed", type=int, default=2, help="noise seeds (the CPU DAgger runs used 1, the shipped table 0)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--chunk", type=int, default=24)
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cpu: a local check of this script")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        worker(args)
        return 0
    started = time.time()
    procs = []
    for k in range(len(FLOORS)):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", str(k)]
        with open(Path(args.out) / f"worker-{k}.log", "w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ))
    codes = [proc.wait() for proc in procs]
    print(f"workers exited {codes} after {time.time() - started:.0f} s")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
