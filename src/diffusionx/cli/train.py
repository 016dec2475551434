"""`diffusionx train`: rebuild the embedded pair or the evaluator, or continue training a pair."""

from __future__ import annotations

from . import options

EXAMPLES = """
diffusionx train pair --resume-from shipped --out runs/pair2 --export-to runs/pair2_export --budget-minutes 90
diffusionx train pair --resume-from runs/pair2_export --out runs/pair3 --seed 20461 --budget-minutes 60
diffusionx train pair --out runs/pair6 --export-to runs/pair6_export --seed 20663 --cloud-share 0 --budget-minutes 75
diffusionx train pair --smoke --out /tmp/smoke --export-to /tmp/smoke_export
diffusionx train embedded --out runs/embedded --budget-minutes 170 --export-to runs/export
diffusionx train evaluator --out runs/evaluator
diffusionx train preview-decoder --out runs/preview_decoder --export-to src/diffusionx/assets/embedded/preview_decoder
"""


def register(sub) -> None:
    p = options.command(sub, "train", "train the embedded model pair or the evaluator from scratch, "
                                      "or continue training a pair (cloud + distilled edge)", EXAMPLES,
                        description="Training recipes, learning curves and samples/s: docs/training.md.")
    p.add_argument("what", choices=("embedded", "pair", "evaluator", "preview-decoder"),
                   help="embedded: rebuild from scratch; pair: continue from --resume-from; evaluator: the scorer; "
                        "preview-decoder: the edge's tiny preview decoder, distilled from the shipped pair's VAE")
    p.add_argument("--resume-from", default="shipped", metavar="DIR",
                   help="pair: the pair folder to start from (shipped: the package's own)")
    p.add_argument("--keep", default="improved", choices=("improved", "always"),
                   help="pair: export only when validation accuracy improved, or always")
    p.add_argument("--out", metavar="DIR",
                   help="checkpoints, logs and results (default runs/WHAT); resumes what is there")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's step count")
    p.add_argument("--export-to", metavar="DIR",
                   help="embedded, pair: write the two diffusers pipeline folders here (default: replace the shipped "
                        "pair); preview-decoder: the AutoencoderTiny folder")
    p.add_argument("--budget-minutes", type=float, help="embedded, pair: fit the step counts to this wall-clock budget")
    p.add_argument("--device", default="cpu", help="embedded, pair: cpu or cuda[:N] (larger batches)")
    p.add_argument("--smoke", action="store_true",
                   help="embedded, pair, preview-decoder: a few steps on tiny data (checks a setup)")
    p.add_argument("--cloud-share", type=options.strength, metavar="F",
                   help="pair: share of the steps in which the cloud and text encoder train (default: the recipe's); "
                        "0 trains the edge alone, distilled from the frozen cloud")
    p.add_argument("--seed", type=int, metavar="N",
                   help="pair: seed of the training scenes and noise (default: the recipe's); give each run of a "
                        "chain its own, so it sees new scenes")
    p.set_defaults(func=run)


def run(args) -> int:
    out = args.out or f"runs/{args.what}"
    if args.what == "embedded":
        from ..training.embedded import SMOKE_CONFIG, train_embedded

        train_embedded(out, steps_scale=args.steps_scale, export_to=args.export_to, budget_minutes=args.budget_minutes,
                       device=args.device, config=SMOKE_CONFIG if args.smoke else None)
        if args.export_to:
            print(f"exported the pair to {args.export_to} (the shipped one lives in src/diffusionx/assets/embedded)")
    elif args.what == "pair":
        from ..errors import InvalidInputError
        from ..training.distill import SMOKE_DISTILL_CONFIG, distill_pair

        if args.smoke and not args.export_to:
            raise InvalidInputError("a smoke run needs --export-to DIR: it must not replace the pair it starts from")
        config = SMOKE_DISTILL_CONFIG if args.smoke else None
        overrides = {k: v for k, v in (("cloud_share", args.cloud_share), ("seed", args.seed)) if v is not None}
        if overrides:
            from dataclasses import replace

            from ..training.distill import default_config

            config = replace(config or default_config(args.device), **overrides)
        summary = distill_pair(out, resume_from=args.resume_from, export_to=args.export_to,
                               budget_minutes=args.budget_minutes, device=args.device, keep=args.keep, config=config)
        before, after = summary["validation_before"], summary["validation_after"]
        print(f"validation attribute accuracy (edge / cloud): before {before['edge']['attribute_accuracy']:.3f} / "
              f"{before['cloud']['attribute_accuracy']:.3f}, after {after['edge']['attribute_accuracy']:.3f} / "
              f"{after['cloud']['attribute_accuracy']:.3f}; {summary['samples_per_s']:.1f} samples/s")
        where = args.export_to or args.resume_from
        print(f"kept: exported to {where}" if summary["kept"] else
              f"not kept (no improvement): the candidate is in {out}/candidate")
    elif args.what == "preview-decoder":
        from ..errors import InvalidInputError
        from ..models import load_pair
        from ..training.preview_decoder import SMOKE_PREVIEW_CONFIG, PreviewDecoderConfig, train_preview_decoder

        if not args.export_to:
            raise InvalidInputError("train preview-decoder needs --export-to DIR (the shipped one: "
                                    "src/diffusionx/assets/embedded/preview_decoder)")
        config = SMOKE_PREVIEW_CONFIG if args.smoke else PreviewDecoderConfig()
        if args.steps_scale != 1.0:
            from dataclasses import replace

            config = replace(config, steps=max(1, round(config.steps * args.steps_scale)))
        report = train_preview_decoder(load_pair("embedded", preview_decoder=None), out, config,
                                       export_to=args.export_to)
        print(f"preview attribute accuracy on {report['validation_images']} edge generations: VAE "
              f"{report['attribute_accuracy_vae']:.3f}, tiny {report['attribute_accuracy_tiny']:.3f}; PSNR tiny vs VAE "
              f"{report['psnr_tiny_vs_vae_db']:.1f} dB (5th percentile {report['psnr_tiny_vs_vae_db_p5']:.1f}); "
              f"decode at batch 1 {report['decode_ms_batch1_vae']:.1f} -> "
              f"{report['decode_ms_batch1_tiny']:.1f} ms; exported to {args.export_to}")
    else:
        from ..metrics.train import train_evaluator

        train_evaluator(out, steps_scale=args.steps_scale)
        print(f"wrote the evaluator to {out} (the shipped one lives in src/diffusionx/assets/evaluator)")
    return 0
