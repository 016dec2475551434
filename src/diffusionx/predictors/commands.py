"""What `diffusionx predictors collect | train | tune | curve` run (the options: diffusionx.cli.predictors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def cmd_collect(args) -> int:
    from ..cli.runtime import preview_decoder_arg
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
        from .specs import policy_from_spec

        if args.rollout_policy.startswith("oracle"):
            raise InvalidInputError(
                "--rollout-policy takes a fixed, learned, load-aware or similarity-rule spec, not an oracle one "
                "(leave it out to continue from the oracle label)"
            )
        try:
            rollout = policy_from_spec(args.rollout_policy)
        except ValueError as err:
            raise InvalidInputError(str(err)) from None
    pair = load_pair(args.model, edge=args.edge, cloud=args.cloud, device=args.device,
                     preview_decoder=preview_decoder_arg(args))
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


def cmd_tune(args) -> int:
    from ..bench import get_profile
    from ..bench.run import load_sessions
    from ..cli.runtime import preview_decoder_arg
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
    pair = load_pair(args.model, preview_decoder=preview_decoder_arg(args))
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
        fidelity_floor=args.fidelity_floor,
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
