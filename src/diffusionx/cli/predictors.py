"""`diffusionx predictors`: options of collect, train, tune and curve (they run diffusionx.predictors.commands)."""

from __future__ import annotations

import argparse

from ..predictors.curves import DEFAULT_EPS, GRID
from . import options

SHIPPED = "src/diffusionx/assets/predictors"
EXAMPLES = """
diffusionx predictors collect --train 150 --validation 50 --out outputs/predictors/sweep.jsonl
diffusionx predictors train --data outputs/predictors/sweep.jsonl --out outputs/predictors/model
diffusionx predictors tune --predictors outputs/predictors/model --n 128 --write
"""


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _strengths(text: str) -> list[float]:
    values = _numbers(text, "strengths")
    if not values or any(not 0.0 < v <= 1.0 for v in values) or values != sorted(values) or values[-1] != 1.0:
        raise argparse.ArgumentTypeError("strengths must be increasing, in (0, 1], and end at 1.0")
    return values


def _floors(text: str) -> list[float]:
    values = _numbers(text, "floors")
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("floors must be strengths in [0, 1]")
    return values


def _tolerances(text: str) -> list[float]:
    values = _numbers(text, "tolerances")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("tolerances must be numbers >= 0")
    return values


def subcommand(psub, name: str, help: str) -> argparse.ArgumentParser:
    return psub.add_parser(name, help=help, description=help, formatter_class=options.HelpFormatter)


def register(sub) -> None:
    p = options.command(sub, "predictors", "noise-level predictors: collect, train, tune, load curve "
                                           "(docs/predictors.md)", EXAMPLES)
    psub = p.add_subparsers(dest="predictors_command", required=True)

    c = subcommand(psub, "collect", "quality/cost sweeps over sessions -> JSONL table (resumable)")
    options.model_options(c, previews=True)
    c.add_argument("--train", type=int, default=150, help="train-split sessions of the embedded world")
    c.add_argument("--validation", type=int, default=50, help="validation-split sessions")
    c.add_argument("--test", type=int, default=0, help="test-split sessions (held out: evaluation only)")
    c.add_argument("--sessions", help="also a JSONL of sessions (any prompts; rounds may be plain strings), "
                                      "under --sessions-split")
    c.add_argument("--sessions-split", default="train", help="split name for --sessions rows ")
    c.add_argument("--strengths", type=_strengths, default=list(GRID), help="comma-separated, ending at 1.0")
    c.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    c.add_argument("--batch", type=int, default=64, help="jobs per U-Net call")
    c.add_argument("--chunk", type=int, default=4, help="sessions per chunk (rows are appended per chunk)")
    c.add_argument("--rollout-eps", type=float, default=DEFAULT_EPS, help="sessions continue from the oracle label")
    c.add_argument(
        "--rollout-policy", "--policy", dest="rollout_policy", type=options.policy_spec, metavar="SPEC",
        help="continue each session from this policy's edge choice instead (a --policy spec such as learned "
        "or learned-emin0-cmin0): rows of the states the policy itself reaches (DAgger)",
    )
    c.add_argument("--device", default="cpu", help="where the model pair runs: cpu or cuda[:N]")
    c.add_argument("--time-budget-min", type=float, default=0.0, help="stop cleanly after about this many minutes")
    c.add_argument(
        "--directions",
        choices=("both", "edge", "cloud"),
        default="both",
        help="edge: edge sweeps + final previews only; cloud: cloud sweeps of --previews ",
    )
    c.add_argument("--previews", nargs="+", help="edge tables whose final previews the cloud direction refines")
    c.add_argument("--shard", help="K/N: only every N-th session from the K-th (parallel collectors, own --out)")
    c.add_argument("--out", default="outputs/predictors/sweep.jsonl")
    c.set_defaults(func=options.lazy("diffusionx.predictors.commands", "cmd_collect"))

    t = subcommand(psub, "train", "fit MLP and gradient-boosted trees, compare on held-out rows, save the better")
    t.add_argument("--data", nargs="+", default=["outputs/predictors/sweep.jsonl"], help="sweep table(s)")
    t.add_argument("--out", default="outputs/predictors/model", help=f"output folder (ship: {SHIPPED})")
    t.add_argument("--model", default="embedded", help="the pair whose text encoder the features use")
    t.add_argument("--eps", type=float, default=DEFAULT_EPS, help="tolerance for the reported labels")
    t.add_argument("--score-weight", type=float, default=1.0, help="q = attribute accuracy + w * score / 100")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-refit", action="store_true", help="ship the train-only fit (default: refit on train+val)")
    t.add_argument("--directions", choices=("edge,cloud", "edge", "cloud"), default="edge,cloud",
                   help="train only one direction; the other's model already in --out is kept")
    t.set_defaults(func=options.lazy("diffusionx.predictors.commands", "cmd_train"))

    u = subcommand(psub, "tune", "choose the learned policy's edge eps and strength floors on validation sessions")
    options.model_options(u, overrides=False, previews=True)
    u.add_argument("--predictors", default=None, help=f"predictor folder (default: the shipped ones, {SHIPPED})")
    u.add_argument("--sessions", help="JSONL of sessions (default: the embedded world's validation split)")
    u.add_argument("--n", type=int, default=128, help="sessions")
    u.add_argument("--edge-eps", type=_tolerances, default=[DEFAULT_EPS],
                   help="comma-separated edge tolerances (each tried with every edge floor)")
    u.add_argument("--edge-floors", type=_floors, default=[0.0, 0.3, 0.4, 0.5, 0.6], help="comma-separated")
    u.add_argument("--cloud-floors", type=_floors, default=[0.0, 0.8, 0.9, 1.0], help="comma-separated")
    u.add_argument("--preview-tolerance", type=float, default=0.02,
                   help="previews of rounds 2+ within this (relative) of regenerating from scratch")
    u.add_argument("--final-tolerance", type=float, default=0.01, help="finals within this (relative) of cloud-only")
    u.add_argument("--fidelity-floor", type=float, default=0.0, metavar="DB",
                   help="finals at least this PSNR from the last preview (0: no floor), e.g. 20")
    u.add_argument("--profile", default="laptop-gpu", help="device profile for the latency the choice minimizes")
    u.add_argument("--batch", type=int, default=64, help="sessions per U-Net call")
    u.add_argument("--write", action="store_true", help="write the chosen floors into the predictors' manifest")
    u.add_argument("--out", default="outputs/predictors/tune", help="folder for the benchmark runs and tune.json")
    u.set_defaults(func=options.lazy("diffusionx.predictors.commands", "cmd_tune"))

    v = subcommand(psub, "curve", "load-aware policy: estimated wait vs chosen strength vs predicted quality (PNG)")
    v.add_argument("--data", nargs="+", default=["outputs/predictors/sweep.jsonl"], help="sweep tables (cloud cases)")
    v.add_argument("--predictors", default=None, help="predictor folder (default: the shipped ones)")
    options.model_options(v, overrides=False, sampling=False)
    v.add_argument("--n", type=int, default=64, help="cases")
    v.add_argument("--max-wait", type=float, default=60.0, help="largest estimated wait (s)")
    v.add_argument("--wait-weight", type=float, default=0.01, help="cost weight per second of wait")
    v.add_argument("--max-drop", type=float, default=0.05, help="quality floor below cloud-only")
    v.add_argument("--eps", type=float, default=DEFAULT_EPS)
    v.add_argument("--out", default="outputs/predictors/load_curve.png")
    v.set_defaults(func=options.lazy("diffusionx.predictors.commands", "cmd_curve"))
