"""`diffusionx evaluate`: quality of the edge vs the cloud model on the test split's final prompts."""

from __future__ import annotations

from . import options
from .runtime import load_pair

EXAMPLES = """
diffusionx evaluate --n 256 --batch 64
diffusionx evaluate --n 128 --refine-strengths 0.3,0.5 --out outputs/evaluate
"""


def register(sub) -> None:
    p = options.command(sub, "evaluate", "quality of the edge vs the cloud model on the test split's final prompts",
                        EXAMPLES, description="CLIP score, FID and attribute accuracy (per check, per object count, "
                                              "color swaps) of both models; writes quality.json and samples.png.")
    options.model_options(p)
    p.add_argument("--sessions", metavar="FILE", help="JSONL of sessions (default: the embedded world's test split)")
    p.add_argument("--n", type=options.positive_int, default=256, help="number of final prompts")
    options.out_option(p, "outputs/evaluate", "output folder")
    p.add_argument("--batch", type=options.positive_int, default=32, help="prompts per U-Net call")
    p.add_argument("--refine-strengths", type=options.strength_list, default=[], metavar="S,S,...",
                   help="also let the cloud refine each edge image at these strengths, e.g. 0.3,0.5,0.7 "
                        "(preview fidelity and quality vs the cloud from noise)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.quality import evaluate_pair
    from ..bench.run import load_sessions

    sessions, _ = load_sessions(args.sessions, args.n)
    pair = load_pair(args)
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
