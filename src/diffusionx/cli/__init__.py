"""`diffusionx` command line: one module per command, shared option groups in `options`.

Exit codes: 0 success; 2 bad usage or input (a model folder that does not exist included);
1 failure (a model that cannot be loaded, a refinement --require-cloud asked for); 130 interrupted.
Building the parser imports no torch: help and input errors come at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import bench, bench_edits, demo, evaluate, generate, predictors, serve, session, train, ui, vocab
from .demo import DEMO_PROMPTS
from .options import HelpFormatter

__all__ = ["COMMANDS", "DEMO_PROMPTS", "build_parser", "main", "run"]

COMMANDS = (demo, session, generate, vocab, ui, serve, bench, evaluate, bench_edits, predictors, train)

DESCRIPTION = """\
Interactive multi-round text-to-image generation split between a small edge model (a fast
preview every round) and a large cloud model (refines the preview you finalize).

exit codes: 0 success, 2 bad input, 1 failure, 130 interrupted"""

EXAMPLES = """
examples:
  diffusionx demo                      # four rounds on the edge model, refined by the cloud model
  diffusionx session                   # your own prompts, one round per line
  diffusionx ui                        # the same in a browser
  diffusionx vocab                     # the words the embedded models know
  diffusionx COMMAND --help            # a command's options and examples
"""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("diffusionx")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusionx", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffusionx {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' logs and loading bars (default: quiet)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def quiet_libraries(verbose: bool) -> None:
    """Library logs and loading bars only with -v (read by diffusers / transformers at import and by
    models.load_pipeline); our own progress bars (rounds, benchmarks, training) always show."""
    level = "info" if verbose else "error"
    os.environ["TRANSFORMERS_VERBOSITY"] = level
    os.environ["DIFFUSERS_VERBOSITY"] = level
    os.environ["DIFFUSIONX_LOADING_BARS"] = "1" if verbose else "0"
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    from ..errors import DiffusionXError, InvalidInputError

    try:
        args = build_parser().parse_args(argv)
        quiet_libraries(args.verbose)
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
        return args.func(args)
    except InvalidInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiffusionXError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `diffusionx` executable: `main`, then exit with its code. After Ctrl-C the process
    leaves at once with 130: the interpreter's own shutdown may still be unwinding the interrupted
    import or render, and could otherwise end the process with the signal instead of the code."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
