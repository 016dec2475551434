"""`diffusionx bench-edits`: round-to-round edits, attention-controlled vs plain (docs/control.md)."""

from __future__ import annotations

from . import options

EXAMPLES = """
diffusionx bench-edits --n 48
diffusionx bench-edits --side cloud --policy fixed-0.5 --out outputs/bench-edits-cloud
diffusionx bench-edits --n 35 --methods fresh,sdedit,local --local-strength 0.9
diffusionx bench-edits --split validation --methods fresh,sdedit,local --write-auto-modes   # choose auto's modes
diffusionx bench-edits --methods fresh,sdedit,local,auto                                   # then measure them
"""

# control.bench.METHODS, without importing torch
METHODS = ("fresh", "sdedit", "p2p", "p2p_blend", "local", "p2p_local", "auto")


def method_list(text: str) -> tuple[str, ...]:
    import argparse

    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in METHODS]
    if bad or "fresh" not in chosen or "sdedit" not in chosen:
        raise argparse.ArgumentTypeError(
            f"methods are a comma-separated list of {', '.join(METHODS)} that includes fresh and sdedit "
            f"(the references); got {text!r}")
    return chosen


def fraction(text: str) -> float:
    return options.strength(text)  # the same range check: a share of the round's steps


def register(sub) -> None:
    p = options.command(sub, "bench-edits", "round-to-round edits: what each method keeps of the unedited region",
                        EXAMPLES, description="Fresh re-generation, SDEdit, Prompt-to-Prompt (with and without "
                                              "local blend) and local edits (DiffEdit mask) on every edit kind: "
                                              "unedited-region PSNR / SSIM, edited attribute right, untouched "
                                              "attributes kept (docs/control.md).")
    options.model_options(p, overrides=False, previews=True)
    p.add_argument("--n", type=options.positive_int, default=96, help="number of round edits")
    options.out_option(p, "outputs/bench-edits", "output folder: edits.json, results.md, edits_grid.png")
    p.add_argument("--policy", type=options.policy_spec, metavar="SPEC",
                   help="the policy whose edge strength SDEdit uses (default: fixed 0.6)")
    group = p.add_argument_group("Prompt-to-Prompt (defaults: the controller's, docs/control.md)")
    group.add_argument("--cross-steps", type=fraction, help="share of the steps with cross-attention injected")
    group.add_argument("--self-steps", type=fraction, help="share of the steps with self-attention injected")
    group.add_argument("--blend-threshold", type=fraction, help="attention share above which a pixel is edited")
    p.add_argument("--methods", type=method_list, default=METHODS, metavar="LIST",
                   help=f"comma-separated methods to measure (default all: {','.join(METHODS)})")
    p.add_argument("--local-strength", type=options.strength, default=1.0, metavar="F",
                   help="the local edit's strength inside its mask (default 1: the region is regenerated)")
    p.add_argument("--local-free-steps", type=options.strength, default=None, metavar="F",
                   help="share of the local edit's steps run on the whole picture before the blend holds the "
                        "rest (default: the session's)")
    p.add_argument("--side", choices=("edge", "cloud"), default="edge",
                   help="the model that runs the rounds (the edge is where edits happen)")
    p.add_argument("--split", choices=("validation", "test"), default="test",
                   help="the world's sessions to take the edits from: choose the auto-mode table on validation "
                        "edits (--write-auto-modes), measure on test ones")
    p.add_argument("--sessions", metavar="FILE",
                   help="JSONL of sessions to take the edits from instead (rounds may be plain strings)")
    p.add_argument("--write-auto-modes", action="store_true",
                   help="store the mode that paid per edit kind where the `auto` round mode reads it "
                        "(src/diffusionx/assets/control/auto_modes.json)")
    p.set_defaults(func=options.lazy("diffusionx.control.bench", "cmd_bench_edits"))
