"""`diffusionx` command line. Exit codes: 0 success, 2 bad usage or input, 1 failure."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# Quiet the libraries' import-time chatter before they are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

DEMO_PROMPTS = (
    "a large red circle on the left on a blue background",
    "a large red circle on the left and a small yellow star at the top right on a blue background",
    "a large green circle on the left and a small yellow star at the top right on a blue background",
    "a large green circle on the left and a small yellow star at the top right on a white background",
)


def _models_line(pair) -> str:
    return f"models: edge {pair.edge_info.label}, cloud {pair.cloud_info.label}"


def _png_meta(pair, **extra: Any):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("diffusionx", json.dumps({"models": pair.describe(), **extra}))
    return info


def _save(image, path: Path, pair, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=_png_meta(pair, **extra))
    return path


def _strip(images: list, labels: list[str], cell: int = 192):
    """Side-by-side strip, small images upscaled (nearest) so a person can see them."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (cell * len(images), cell + 18), "white")
    draw = ImageDraw.Draw(strip)
    for i, (image, label) in enumerate(zip(images, labels)):
        strip.paste(image.resize((cell, cell), Image.NEAREST), (i * cell, 0))
        draw.text((i * cell + 4, cell + 3), label, fill="black")
    return strip


def _load(args):
    from .models import load_pair

    pair = load_pair(args.model, edge=getattr(args, "edge", None), cloud=getattr(args, "cloud", None))
    print(_models_line(pair), file=sys.stderr)
    return pair


def _cloud(args):
    """The cloud service client when --cloud URL is given; None means in-process refinement."""
    if not args.cloud_url:
        return None
    from .client import CloudClient

    return CloudClient(args.cloud_url, args.token or os.environ.get("DIFFUSIONX_TOKEN"))


def cmd_demo(args) -> int:
    from .policies import FixedStrength
    from .session import EdgeSession

    start = time.perf_counter()
    out = Path(args.out)
    pair = _load(args)
    policy = FixedStrength(edge=args.edge_strength, cloud=args.cloud_strength)
    session = EdgeSession(pair, policy=policy, steps=args.steps, seed=args.seed, cloud=_cloud(args))
    for prompt in DEMO_PROMPTS:
        r = session.generate(prompt, progress=True)
        _save(r.image, out / f"round_{r.index:02d}.png", pair, round=r.summary())
    final = session.finalize()
    _save(final.image, out / "final.png", pair, final=final.summary())
    labels = [f"round {r.index} s={r.strength:.2f}" for r in session.rounds]
    labels.append("final (cloud)" if final.refined else "final (NOT refined)")
    _strip([r.image for r in session.rounds] + [final.image], labels).save(out / "strip.png")
    wall = time.perf_counter() - start
    report = {
        "models": pair.describe(),
        "rounds": session.history(),
        "final": final.summary(),
        "wall_seconds": wall,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"{'round':>5}  {'mode':<8} {'strength':>8} {'U-Net steps':>11} {'edge s':>7}  prompt")
    for r in session.rounds:
        print(f"{r.index:>5}  {r.mode:<8} {r.strength:>8.2f} {r.unet_steps:>11} {r.timing.total_s:>7.3f}  {r.prompt}")
    status = "refined" if final.refined else f"NOT refined: {final.reason}"
    print(
        f"final: cloud strength {final.strength:.2f}, {final.unet_steps} U-Net steps, "
        f"{final.cloud_seconds:.3f} s cloud, {final.bytes_up} B up / {final.bytes_down} B down ({status})"
    )
    print(f"wrote {out}/round_01.png .. final.png, strip.png, report.json in {wall:.1f} s")
    if pair.describe()["untrained"]:
        print("NOTE: the models are UNTRAINED stand-ins; the images are noise.")
    return 0


def cmd_generate(args) -> int:
    pair = _load(args)
    engine = pair.edge if args.side == "edge" else pair.cloud
    gen = engine.generate(args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance, progress=True)
    path = _save(gen.image, Path(args.out), pair, prompt=args.prompt, seed=args.seed, steps=args.steps,
                 out_of_vocabulary=list(gen.unknown_words))
    info = pair.edge_info if args.side == "edge" else pair.cloud_info
    print(f"wrote {path} ({info.label}, {gen.unet_steps} steps, {gen.timing.total_s:.3f} s)")
    return 0


def cmd_vocab(args) -> int:
    from .world.captions import POSITION_PHRASES, SIZE_WORDS
    from .world.vocab import COLORS, EXAMPLE_PROMPTS, SHAPES

    print("The embedded models know only their synthetic world: one to three objects on a plain background.")
    print("An object needs its shape; size, color and position may be left out, and so may the background.\n")
    print(f"shapes     {', '.join(SHAPES)}")
    print(f"colors     {', '.join(COLORS)}")
    print("sizes      " + "; ".join(f"{size}: {', '.join(words)}" for size, words in SIZE_WORDS.items()))
    print("positions  " + ", ".join(POSITION_PHRASES))
    print("           (as 'on the left', 'at the top', 'in the top right corner', 'in the middle', ...)")
    print("background '<color> background', 'on a <color> background', 'with a <color> backdrop'\n")
    print("examples:")
    for prompt in EXAMPLE_PROMPTS:
        print(f"  {prompt}")
    print("\nWith real models (--model sd15) any text works.")
    return 0


SESSION_HELP = "type a prompt for the next round; /back N branches from round N; /history; /final refines; /quit"


def cmd_session(args) -> int:
    from .errors import InvalidInputError
    from .policies import FixedStrength
    from .session import EdgeSession

    out = Path(args.out)
    pair = _load(args)
    policy = FixedStrength(edge=args.edge_strength, cloud=args.cloud_strength)
    session = EdgeSession(pair, policy=policy, steps=args.steps, seed=args.seed, cloud=_cloud(args))
    print(SESSION_HELP)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                break
            elif line == "/history":
                for r in session.rounds:
                    marker = "*" if r.index == session.head else " "
                    print(f"{marker}{r.index:>3} {r.mode:<8} s={r.strength:.2f} {r.prompt}")
            elif line.startswith("/back"):
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise InvalidInputError("usage: /back N (N = a round number from /history)")
                r = session.back(int(parts[1]))
                print(f"next round branches from round {r.index}: {r.prompt}")
            elif line == "/final":
                final = session.finalize()
                path = _save(final.image, out / "final.png", pair, final=final.summary())
                state = "refined by the cloud" if final.refined else f"NOT refined ({final.reason})"
                print(f"final ({state}, strength {final.strength:.2f}): {path}")
            elif line.startswith("/"):
                raise InvalidInputError(f"unknown command {line.split()[0]}; {SESSION_HELP}")
            else:
                r = session.generate(line)
                path = _save(r.image, out / f"round_{r.index:02d}.png", pair, round=r.summary())
                print(f"round {r.index} ({r.mode}, strength {r.strength:.2f}, {r.timing.total_s:.2f} s): {path}")
        except InvalidInputError as err:
            print(f"error: {err}")
        sys.stdout.flush()
    return 0


def cmd_train(args) -> int:
    out = args.out or f"runs/{args.what}"
    if args.what == "embedded":
        from .training.embedded import SMOKE_CONFIG, train_embedded

        train_embedded(out, steps_scale=args.steps_scale, export_to=args.export_to, budget_minutes=args.budget_minutes,
                       device=args.device, config=SMOKE_CONFIG if args.smoke else None)
        if args.export_to:
            print(f"exported the pair to {args.export_to} (the shipped one lives in src/diffusionx/assets/embedded)")
    elif args.what == "pair":
        from .errors import InvalidInputError
        from .training.distill import SMOKE_DISTILL_CONFIG, distill_pair

        if args.smoke and not args.export_to:
            raise InvalidInputError("a smoke run needs --export-to DIR: it must not replace the pair it starts from")
        summary = distill_pair(out, resume_from=args.resume_from, export_to=args.export_to,
                               budget_minutes=args.budget_minutes, device=args.device, keep=args.keep,
                               config=SMOKE_DISTILL_CONFIG if args.smoke else None)
        before, after = summary["validation_before"], summary["validation_after"]
        print(f"validation attribute accuracy (edge / cloud): before {before['edge']['attribute_accuracy']:.3f} / "
              f"{before['cloud']['attribute_accuracy']:.3f}, after {after['edge']['attribute_accuracy']:.3f} / "
              f"{after['cloud']['attribute_accuracy']:.3f}; {summary['samples_per_s']:.1f} samples/s")
        where = args.export_to or args.resume_from
        print(f"kept: exported to {where}" if summary["kept"] else
              f"not kept (no improvement): the candidate is in {out}/candidate")
    else:
        from .metrics.train import train_evaluator

        train_evaluator(out, steps_scale=args.steps_scale)
        print(f"wrote the evaluator to {out} (the shipped one lives in src/diffusionx/assets/evaluator)")
    return 0


def cmd_bench(args) -> int:
    from .bench import default_methods, get_profile, load_sessions, parse_policy, read_calibration, run_bench
    from .engine import check_steps

    check_steps(args.steps)
    profile = get_profile(args.profile)
    sessions, workload = load_sessions(args.sessions, args.n)
    if args.policy:
        chosen = [parse_policy(spec, args.edge_strength, args.oracle_sweeps) for spec in args.policy]
        methods = default_methods([]) + chosen
    else:
        methods = default_methods([0.3, 0.5], edge_strength=args.edge_strength)
    pair = _load(args)
    if args.calibrate_only:
        from .bench import write_calibration

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
        from .bench import write_calibration
        from .models import load_pair

        print("timing the random-weight SD v1.5 and Tiny-SD at 512x512 (minutes on a CPU)...", file=sys.stderr)
        calibration = write_calibration(load_pair("random-sd15"), Path(args.out, "calibration.json"), repeats=1)
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


def cmd_evaluate(args) -> int:
    from .bench.quality import evaluate_pair
    from .bench.run import load_sessions
    from .engine import check_steps

    check_steps(args.steps)
    sessions, _ = load_sessions(args.sessions, args.n)
    pair = _load(args)
    report = evaluate_pair(pair, sessions, args.out, steps=args.steps, batch=args.batch, seed=args.seed,
                           refine_strengths=tuple(args.refine_strengths))
    checks = ("shape", "color", "size", "position", "background")

    def cells(accuracies: dict) -> str:
        return " ".join("n/a".rjust(10) if accuracies[c] is None else f"{accuracies[c]:>10.3f}" for c in checks)

    print(f"{'model':<6} {'CLIP score':>10} {'FID':>8} {'attribute acc.':>15} {'swaps':>6}  "
          + " ".join(f"{c:>10}" for c in checks))
    for role in ("edge", "cloud"):
        q = report[role]
        fid = "n/a" if q["fid"] is None else f"{q['fid']:.2f}"
        swap = "n/a" if q["color_swap_rate"] is None else f"{q['color_swap_rate']:.3f}"
        accuracy = "n/a" if q["attribute_accuracy"] is None else f"{q['attribute_accuracy']:.3f}"  # none parse
        print(f"{role:<6} {q['clip_score']:>10.2f} {fid:>8} {accuracy:>15} {swap:>6}  {cells(q['per_attribute'])}")
        for count, row in q["by_object_count"].items():
            print(f"  {count} object(s), n={row['n']:<4} {'':>13} {row['attribute_accuracy']:>15.3f} {'':>6}  "
                  f"{cells(row)}")
    for row in report.get("refinement", []):
        fid = "n/a" if row["fid_vs_cloud"] is None else f"{row['fid_vs_cloud']:.2f}x"
        if row["attribute_accuracy"] is None:
            accuracy = "n/a"
        else:
            accuracy = f"{row['attribute_accuracy']:.3f} ({row['attribute_accuracy_vs_cloud']:.1%} of the cloud's)"
        print(f"cloud refining the edge image at {row['strength']:g}: attribute acc. {accuracy}, "
              f"FID {fid} the cloud's, PSNR preview -> final {row['psnr_preview_final_db']:.1f} dB")
    print(
        f"wrote {args.out}/quality.json and samples.png ({report['settings']['n_prompts']} prompts, "
        f"{report['wall_seconds']:.0f} s)"
    )
    return 0


def _strength_list(text: str) -> list[float]:
    return [_strength(part) for part in text.split(",") if part.strip()]


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"strength must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"strength must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models import PRESETS

    parser = argparse.ArgumentParser(prog="diffusionx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default="embedded", choices=sorted(PRESETS), help="model pair preset")
        p.add_argument("--edge-model", dest="edge", help="edge model: a Hugging Face id or a diffusers folder")
        p.add_argument("--cloud-model", dest="cloud", help="cloud model: a Hugging Face id or a diffusers folder")
        p.add_argument("--steps", type=int, default=20, help="scheduler steps (default 20)")
        p.add_argument("--seed", type=int, default=0, help="random seed (integer)")

    def session_args(p):
        p.add_argument("--edge-strength", type=_strength, default=0.6, help="round-to-round strength")
        p.add_argument("--cloud-strength", type=_strength, default=0.5, help="cloud refinement strength")
        p.add_argument("--cloud", dest="cloud_url", metavar="URL", help="cloud service URL (default: in-process)")
        p.add_argument("--token", help="bearer token for --cloud (default: $DIFFUSIONX_TOKEN)")

    p = sub.add_parser("demo", help="a scripted multi-round session, finalized by the cloud model")
    model_args(p)
    session_args(p)
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="one text-to-image generation")
    p.add_argument("prompt")
    model_args(p)
    p.add_argument("--side", choices=("edge", "cloud"), default="edge", help="which model of the pair")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--out", default="outputs/generate.png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("vocab", help="the words and example prompts the embedded models know")
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("session", help="interactive multi-round session in the terminal")
    model_args(p)
    session_args(p)
    p.add_argument("--out", default="outputs/session")
    p.set_defaults(func=cmd_session)

    p = sub.add_parser("bench", help="the paper's comparison: cloud-only vs edge-only vs DiffusionX")
    model_args(p)
    p.add_argument("--sessions", help="JSONL of sessions (default: the embedded world's test split)")
    p.add_argument("--n", type=int, default=256, help="number of sessions (default 256: FID needs many finals)")
    p.add_argument("--out", default="outputs/bench", help="output folder")
    p.add_argument(
        "--policy",
        action="append",
        help="DiffusionX policy, repeatable: fixed-C, fixed-E-C, learned, load-aware, similarity-rule, oracle "
        "(see docs/predictors.md)",
    )
    p.add_argument("--edge-strength", type=_strength, default=0.6, help="edge strength for fixed-C policies")
    p.add_argument("--oracle-sweeps", action="append", metavar="FILE",
                   help="sweep table(s) of these sessions for --policy oracle (`predictors collect --test N`)")
    p.add_argument("--profile", default="laptop-gpu", help="device profile: measured, laptop-gpu, phone-4g")
    p.add_argument("--batch", type=int, default=32, help="sessions per U-Net call while generating")
    p.add_argument(
        "--calibration",
        help="compute times for the latency model from this JSON (e.g. of the real SD v1.5 / Tiny-SD "
        "architectures, written by --calibrate-only --model random-sd15) instead of measuring --model",
    )
    p.add_argument(
        "--arch",
        choices=("embedded", "sd15"),
        default="embedded",
        help="sd15: latency and cloud-cost columns for SD v1.5 (cloud) / Tiny-SD (edge) at 512x512, timed with "
        "random weights on this machine; quality columns n/a",
    )
    p.add_argument(
        "--calibrate-only", action="store_true", help="measure --model's compute times, write OUT/calibration.json"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evaluate", help="quality of the edge vs the cloud model on the test split's final prompts")
    model_args(p)
    p.add_argument("--sessions", help="JSONL of sessions (default: the embedded world's test split)")
    p.add_argument("--n", type=int, default=256, help="number of final prompts (default 256)")
    p.add_argument("--out", default="outputs/evaluate", help="output folder")
    p.add_argument("--batch", type=int, default=32, help="prompts per U-Net call")
    p.add_argument("--refine-strengths", type=_strength_list, default=[], metavar="S,S,...",
                   help="also let the cloud refine each edge image at these strengths, e.g. 0.3,0.5,0.7 "
                        "(preview fidelity and quality vs the cloud from noise)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train the embedded model pair or the evaluator from scratch, "
                                     "or continue training a pair (cloud + distilled edge)")
    p.add_argument("what", choices=("embedded", "pair", "evaluator"),
                   help="embedded: rebuild from scratch; pair: continue from --resume-from (docs/training.md)")
    p.add_argument("--resume-from", default="shipped",
                   help="pair: the pair folder to start from (default: shipped, the package's own)")
    p.add_argument("--keep", default="improved", choices=("improved", "always"),
                   help="pair: export only when validation accuracy improved (default), or always")
    p.add_argument("--out", help="checkpoints, logs and results (default runs/WHAT); resumes what is there")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's step count")
    p.add_argument("--export-to", help="embedded: write the two diffusers pipeline folders here")
    p.add_argument("--budget-minutes", type=float, help="embedded, pair: fit the step counts to this wall-clock budget")
    p.add_argument("--device", default="cpu", help="embedded, pair: cpu (default) or cuda[:N] (larger batches)")
    p.add_argument("--smoke", action="store_true", help="embedded, pair: a few steps on tiny data (checks a setup)")
    p.set_defaults(func=cmd_train)

    from .control.bench import add_bench_edits_parser

    add_bench_edits_parser(sub)

    from .predictors.cli import add_predictors_parser

    add_predictors_parser(sub)

    from .server.config import add_serve_arguments, cmd_serve

    p = sub.add_parser("serve", help="the cloud refinement service over HTTP (docs/serving.md)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from .ui import add_ui_arguments, cmd_ui

    p = sub.add_parser("ui", help="the web page for interactive sessions (docs/ui.md)")
    add_ui_arguments(p)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import DiffusionXError, InvalidInputError

    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return args.func(args)
    except InvalidInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiffusionXError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
