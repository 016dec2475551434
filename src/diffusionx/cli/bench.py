"""`diffusionx bench`: the paper's comparison, cloud-only vs edge-only vs DiffusionX."""

from __future__ import annotations

import sys
from pathlib import Path

from ..predictors.specs import SPEC_HELP
from . import options
from .runtime import load_pair

EXAMPLES = """
diffusionx bench --n 64 --out outputs/bench
diffusionx bench --policy learned --policy fixed-0.6-0.5 --n 192
diffusionx bench --arch sd15 --n 32          # latency of the real SD v1.5 / Tiny-SD architectures
"""


def register(sub) -> None:
    p = options.command(sub, "bench", "the paper's comparison: cloud-only vs edge-only vs DiffusionX", EXAMPLES,
                        description="Runs sessions through every method; writes results.json, results.md and "
                                    "plots (docs/benchmark.md).")
    options.model_options(p, previews=True)
    p.add_argument("--sessions", metavar="FILE", help="JSONL of sessions (default: the embedded world's test split)")
    p.add_argument("--n", type=options.positive_int, default=256, help="number of sessions (FID needs many finals)")
    options.out_option(p, "outputs/bench", "output folder")
    p.add_argument("--policy", action="append", metavar="SPEC", type=options.policy_spec,
                   help=f"DiffusionX policy, repeatable: {SPEC_HELP}")
    p.add_argument("--edge-strength", type=options.strength, default=0.6, help="edge strength for fixed-C policies")
    p.add_argument("--oracle-sweeps", action="append", metavar="FILE",
                   help="sweep table(s) of these sessions for --policy oracle (`predictors collect --test N`)")
    p.add_argument("--profile", default="laptop-gpu", help="device profile: measured, laptop-gpu, phone-4g")
    p.add_argument("--batch", type=options.positive_int, default=32, help="sessions per U-Net call while generating")
    p.add_argument("--calibration", metavar="FILE",
                   help="compute times for the latency model from this JSON (e.g. of the real SD v1.5 / Tiny-SD "
                        "architectures, written by --calibrate-only --model random-sd15) instead of measuring --model")
    p.add_argument("--arch", choices=("embedded", "sd15"), default="embedded",
                   help="sd15: latency and cloud-cost columns for SD v1.5 (cloud) / Tiny-SD (edge) at 512x512, timed "
                        "with random weights on this machine; quality columns n/a")
    p.add_argument("--calibrate-only", action="store_true",
                   help="measure --model's compute times, write OUT/calibration.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench import default_methods, get_profile, load_sessions, parse_policy, read_calibration, run_bench

    profile = get_profile(args.profile)
    sessions, workload = load_sessions(args.sessions, args.n)
    if args.policy:
        chosen = [parse_policy(spec, args.edge_strength, args.oracle_sweeps) for spec in args.policy]
        methods = default_methods([]) + chosen
    else:
        methods = default_methods([0.3, 0.5], edge_strength=args.edge_strength)
    pair = load_pair(args)
    if args.calibrate_only:
        from ..bench import write_calibration

        path = Path(args.out, "calibration.json")
        calib = write_calibration(pair, path)
        for role in ("edge", "cloud"):
            print(f"{role}: " + ", ".join(f"{k} {v:.4f}" for k, v in calib[role].items()))
        print(f"wrote {path}")
        return 0
    calibration = read_calibration(args.calibration) if args.calibration else None
    if args.arch == "sd15" and calibration is None:
        # Latency and cloud cost of the real architectures: time SD v1.5 / Tiny-SD at 512x512 with
        # random weights (one step each, extrapolated per step); step counts come from --model's run.
        from ..bench import write_calibration
        from ..models import load_pair as load_preset

        print("timing the random-weight SD v1.5 and Tiny-SD at 512x512 (minutes on a CPU)...", file=sys.stderr)
        calibration = write_calibration(load_preset("random-sd15"), Path(args.out, "calibration.json"), repeats=1)
    report = run_bench(
        pair,
        sessions,
        methods,
        profile,
        args.out,
        workload=workload,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        calibration=calibration,
        score_quality=args.arch != "sd15",
    )
    print(Path(args.out, "results.md").read_text())
    print(
        f"wrote {args.out}/results.json, results.md, latency_quality.png, per_round_latency.png, finals_grid.png "
        f"in {report['wall_seconds']:.0f} s"
    )
    return 0
