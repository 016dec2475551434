"""`diffusionx predictors collect | train | tune | curve` (wired into diffusionx.cli.build_parser)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _numbers(text: str, what: str) -> list[float]:
    import argparse

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _strengths(text: str) -> list[float]:
    import argparse

    values = _numbers(text, "strengths")
    if not values or any(not 0.0 < v <= 1.0 for v in values) or values != sorted(values) or values[-1] != 1.0:
        raise argparse.ArgumentTypeError("strengths must be increasing, in (0, 1], and end at 1.0")
    return values


def cmd_collect(args) -> int:
    from ..errors import InvalidInputError
    from ..models import load_pair
    from ..world import generate_sessions, read_jsonl
    from ..world.sessions import normalize_session
    from .collect import collect, interleave, previews_from

    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for split in ("train", "validation", "test"):
        n = getattr(args, split)
        if n < 0:
            raise InvalidInputError(f"--{split} must be >= 0")
        if n:
            groups.append((split, generate_sessions(n, split)))
    if args.sessions:
        try:
            custom = read_jsonl(args.sessions)
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidInputError(f"cannot read sessions from {args.sessions}: {err}") from None
        try:  # rounds may be plain strings: {"rounds": ["a circle", "a red circle"]}
            custom = [normalize_session(s, i) for i, s in enumerate(custom)]
        except ValueError as err:
            raise InvalidInputError(f"{args.sessions}: {err}") from None
        if not custom:
            raise InvalidInputError(f"{args.sessions} holds no sessions")
        groups.append((args.sessions_split, custom))
    previews = None
    if args.directions == "cloud":
        if not args.previews:
            raise InvalidInputError(
                "--directions cloud needs --previews: edge tables (collected with --directions edge)"
            )
        previews = previews_from(args.previews)
        if not previews:
            raise InvalidInputError(f"no final previews in {args.previews}")
    elif not groups:
        raise InvalidInputError("nothing to collect: give --train/--validation/--test counts or --sessions FILE")
    rollout = None
    if args.rollout_policy:
        from .specs import is_predictor_spec, policy_from_spec

        if not is_predictor_spec(args.rollout_policy) or args.rollout_policy.startswith("oracle"):
            raise InvalidInputError(
                f"--rollout-policy takes a learned, load-aware or similarity-rule spec, not {args.rollout_policy!r} "
                "(leave it out to continue from the oracle label)"
            )
        try:
            rollout = policy_from_spec(args.rollout_policy)
        except ValueError as err:
            raise InvalidInputError(str(err)) from None
    pair = load_pair(args.model, edge=args.edge, cloud=args.cloud, device=args.device)
    print(f"models: edge {pair.edge_info.label}, cloud {pair.cloud_info.label}", file=sys.stderr)
    budget = args.time_budget_min * 60 if args.time_budget_min else None
    work = interleave(groups)
    if args.shard:
        try:
            k, n = (int(v) for v in args.shard.split("/"))
            if not 0 <= k < n:
                raise ValueError
        except ValueError:
            raise InvalidInputError(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}") from None
        work = work[k::n]
        previews = previews[k::n] if previews is not None else None
    summary = collect(
        pair,
        work,
        args.out,
        steps=args.steps,
        guidance_scale=args.guidance,
        grid=args.strengths,
        seed=args.seed,
        batch=args.batch,
        chunk=args.chunk,
        rollout_eps=args.rollout_eps,
        time_budget_s=budget,
        directions=args.directions,
        previews=previews,
        rollout=rollout,
        rollout_name=args.rollout_policy,
    )
    print(json.dumps(summary, indent=1))
    if summary["remaining"]:
        print(f"{summary['remaining']} sessions left: run the same command again to resume", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from ..errors import InvalidInputError
    from .train import train_predictors

    data, directions = args.data, tuple(args.directions.split(","))
    for f in data:
        if not Path(f).is_file():
            raise InvalidInputError(f"no sweep table at {f}: run `diffusionx predictors collect` first")
    try:
        report = train_predictors(
            data,
            args.out,
            eps=args.eps,
            score_weight=args.score_weight,
            text_encoder=args.model,
            seed=args.seed,
            refit_all=not args.no_refit,
            directions=directions,
        )
    except ValueError as err:
        raise InvalidInputError(str(err)) from None
    print(Path(args.out, "train_report.md").read_text())
    for kind, d in report["directions"].items():
        verb = "shipped" if kind in directions else "kept"
        print(f"{kind}: {verb} {d['selected']} -> {args.out}")
    return 0


def cmd_curve(args) -> int:
    import numpy as np

    from ..errors import InvalidInputError
    from ..models import load_pair
    from .collect import decode_latents, read_rows
    from .plots import load_curve, plot_load_curve
    from .policies import LoadAwarePolicy, Predictors

    cloud = [r for path in args.data for r in read_rows(path) if r.get("kind") == "cloud"]
    rows = [r for r in cloud if r.get("split") != "train"] + [r for r in cloud if r.get("split") == "train"]
    if not rows:
        raise InvalidInputError(f"no cloud rows in {args.data}")
    rows = rows[: args.n]
    pair = load_pair(args.model)
    predictors = Predictors.load(args.predictors, engine=pair.edge)
    policy = LoadAwarePolicy(predictors, wait_weight=args.wait_weight, max_drop=args.max_drop, cloud_eps=args.eps)
    from .curves import row_gaps

    score_weight = float(predictors.manifest.get("score_weight", 1.0))
    cases = [
        (r["prompt"], decode_latents(r["latents"]), list(row_gaps(r, score_weight)))
        for r in rows
        if [float(x) for x in r["strengths"]] == list(predictors.grid)
    ]
    curve = load_curve(policy, cases, np.linspace(0.0, args.max_wait, 13))
    out = Path(args.out)
    plot_load_curve(curve, out)
    out.with_suffix(".json").write_text(json.dumps(curve, indent=1))
    print(f"{'wait s':>7} {'strength':>8} {'pred. gap':>9} {'meas. gap':>9}")
    measured = curve.get("measured_gap") or [float("nan")] * len(curve["wait_s"])
    for w, s, g, m in zip(curve["wait_s"], curve["strength"], curve["predicted_gap"], measured):
        print(f"{w:>7.1f} {s:>8.3f} {g:>+9.4f} {m:>+9.4f}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _floors(text: str) -> list[float]:
    import argparse

    values = _numbers(text, "floors")
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("floors must be strengths in [0, 1]")
    return values


def _tolerances(text: str) -> list[float]:
    import argparse

    values = _numbers(text, "tolerances")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("tolerances must be numbers >= 0")
    return values


def cmd_tune(args) -> int:
    from ..bench import get_profile
    from ..bench.run import load_sessions
    from ..errors import InvalidInputError
    from ..models import load_pair
    from ..world import generate_sessions
    from .policies import ASSET_DIR
    from .tune import tune_policy

    if args.sessions:
        sessions, workload = load_sessions(args.sessions, args.n)
    elif args.n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {args.n}")
    else:  # never the test split: the floors are chosen here and judged there
        sessions, workload = generate_sessions(args.n, "validation"), "embedded world, validation split"
    folder = Path(args.predictors or ASSET_DIR)
    if not (folder / "predictors.json").is_file():
        raise InvalidInputError(f"no predictors in {folder}: run `diffusionx predictors train` first")
    pair = load_pair(args.model)
    summary = tune_policy(
        pair,
        sessions,
        folder,
        args.out,
        edge_floors=args.edge_floors,
        cloud_floors=args.cloud_floors,
        edge_eps=args.edge_eps,
        preview_tolerance=args.preview_tolerance,
        final_tolerance=args.final_tolerance,
        profile=get_profile(args.profile),
        workload=workload,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        write=args.write,
    )
    print(json.dumps(summary, indent=1))
    chosen = summary["policy_defaults"]
    where = f"written to {folder / 'predictors.json'}" if args.write else "not written (add --write)"
    print(f"floors: edge {chosen['min_edge']:g}, cloud {chosen['min_cloud']:g}; {where}", file=sys.stderr)
    return 0


def add_predictors_parser(sub) -> None:
    from ..models import PRESETS
    from .curves import DEFAULT_EPS, GRID
    from .policies import ASSET_DIR

    p = sub.add_parser("predictors", help="noise-level predictors: collect, train, load curve (docs/predictors.md)")
    psub = p.add_subparsers(dest="predictors_command", required=True)

    c = psub.add_parser("collect", help="quality/cost sweeps over sessions -> JSONL table (resumable)")
    c.add_argument("--model", default="embedded", choices=sorted(PRESETS), help="model pair preset")
    c.add_argument("--edge-model", dest="edge", help="edge model: a Hugging Face id or a diffusers folder")
    c.add_argument("--cloud-model", dest="cloud", help="cloud model: a Hugging Face id or a diffusers folder")
    c.add_argument("--train", type=int, default=150, help="train-split sessions of the embedded world")
    c.add_argument("--validation", type=int, default=50, help="validation-split sessions")
    c.add_argument("--test", type=int, default=0, help="test-split sessions (held out: evaluation only)")
    c.add_argument("--sessions", help="also a JSONL of sessions (any prompts; rounds may be plain strings), "
                                      "under --sessions-split")
    c.add_argument("--sessions-split", default="train", help="split name for --sessions rows (default train)")
    c.add_argument("--strengths", type=_strengths, default=list(GRID), help="comma-separated, ending at 1.0")
    c.add_argument("--steps", type=int, default=20, help="scheduler steps (default 20, as the benchmark)")
    c.add_argument("--guidance", type=float, default=7.5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=64, help="jobs per U-Net call")
    c.add_argument("--chunk", type=int, default=4, help="sessions per chunk (rows are appended per chunk)")
    c.add_argument("--rollout-eps", type=float, default=DEFAULT_EPS, help="sessions continue from the oracle label")
    c.add_argument(
        "--rollout-policy",
        help="continue each session from this policy's edge choice instead (a --policy spec such as learned "
        "or learned-emin0-cmin0): rows of the states the policy itself reaches (DAgger)",
    )
    c.add_argument("--device", default="cpu", help="where the model pair runs: cpu (default) or cuda[:N]")
    c.add_argument("--time-budget-min", type=float, default=0.0, help="stop cleanly after about this many minutes")
    c.add_argument(
        "--directions",
        choices=("both", "edge", "cloud"),
        default="both",
        help="edge: edge sweeps + final previews only; cloud: cloud sweeps of --previews (default both)",
    )
    c.add_argument("--previews", nargs="+", help="edge tables whose final previews the cloud direction refines")
    c.add_argument("--shard", help="K/N: only every N-th session from the K-th (parallel collectors, own --out)")
    c.add_argument("--out", default="outputs/predictors/sweep.jsonl")
    c.set_defaults(func=cmd_collect)

    t = psub.add_parser("train", help="fit MLP and gradient-boosted trees, compare on held-out rows, save the better")
    t.add_argument("--data", nargs="+", default=["outputs/predictors/sweep.jsonl"], help="sweep table(s)")
    t.add_argument("--out", default="outputs/predictors/model", help=f"output folder (ship: {ASSET_DIR})")
    t.add_argument("--model", default="embedded", help="the pair whose text encoder the features use")
    t.add_argument("--eps", type=float, default=DEFAULT_EPS, help="tolerance for the reported labels")
    t.add_argument("--score-weight", type=float, default=1.0, help="q = attribute accuracy + w * score / 100")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-refit", action="store_true", help="ship the train-only fit (default: refit on train+val)")
    t.add_argument("--directions", choices=("edge,cloud", "edge", "cloud"), default="edge,cloud",
                   help="train only one direction; the other's model already in --out is kept")
    t.set_defaults(func=cmd_train)

    u = psub.add_parser("tune", help="choose the learned policy's edge eps and strength floors on validation sessions")
    u.add_argument("--model", default="embedded", choices=sorted(PRESETS), help="model pair preset")
    u.add_argument("--predictors", default=None, help=f"predictor folder (default: the shipped ones, {ASSET_DIR})")
    u.add_argument("--sessions", help="JSONL of sessions (default: the embedded world's validation split)")
    u.add_argument("--n", type=int, default=128, help="sessions (default 128)")
    u.add_argument("--edge-eps", type=_tolerances, default=[DEFAULT_EPS],
                   help="comma-separated edge tolerances (each tried with every edge floor)")
    u.add_argument("--edge-floors", type=_floors, default=[0.0, 0.3, 0.4, 0.5, 0.6], help="comma-separated")
    u.add_argument("--cloud-floors", type=_floors, default=[0.0, 0.8, 0.9, 1.0], help="comma-separated")
    u.add_argument("--preview-tolerance", type=float, default=0.02,
                   help="previews of rounds 2+ within this (relative) of regenerating from scratch")
    u.add_argument("--final-tolerance", type=float, default=0.01, help="finals within this (relative) of cloud-only")
    u.add_argument("--profile", default="laptop-gpu", help="device profile for the latency the choice minimizes")
    u.add_argument("--steps", type=int, default=20)
    u.add_argument("--batch", type=int, default=64, help="sessions per U-Net call")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--write", action="store_true", help="write the chosen floors into the predictors' manifest")
    u.add_argument("--out", default="outputs/predictors/tune", help="folder for the benchmark runs and tune.json")
    u.set_defaults(func=cmd_tune)

    v = psub.add_parser("curve", help="load-aware policy: estimated wait vs chosen strength vs predicted quality (PNG)")
    v.add_argument("--data", nargs="+", default=["outputs/predictors/sweep.jsonl"], help="sweep tables (cloud cases)")
    v.add_argument("--predictors", default=None, help="predictor folder (default: the shipped ones)")
    v.add_argument("--model", default="embedded", choices=sorted(PRESETS))
    v.add_argument("--n", type=int, default=64, help="cases")
    v.add_argument("--max-wait", type=float, default=60.0, help="largest estimated wait (s)")
    v.add_argument("--wait-weight", type=float, default=0.01, help="cost weight per second of wait")
    v.add_argument("--max-drop", type=float, default=0.05, help="quality floor below cloud-only")
    v.add_argument("--eps", type=float, default=DEFAULT_EPS)
    v.add_argument("--out", default="outputs/predictors/load_curve.png")
    v.set_defaults(func=cmd_curve)
