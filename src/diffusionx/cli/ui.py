"""`diffusionx ui`: the web page for interactive sessions (docs/ui.md)."""

from __future__ import annotations

import argparse
import math

from ..ui import DEFAULT_PORT
from . import options

EXAMPLES = f"""
diffusionx ui                                   # then open http://127.0.0.1:{DEFAULT_PORT}/
diffusionx ui --cloud-url http://127.0.0.1:8000 --token $TOKEN
diffusionx ui --state memory                    # sessions forgotten on restart
"""


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {text}")
    return value


def register(sub) -> None:
    p = options.command(sub, "ui", "the web page for interactive sessions (docs/ui.md)", EXAMPLES)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    options.model_options(p, random_seed=True, previews=True)
    group = p.add_argument_group("session")
    options.strength_options(group)
    options.policy_option(group)
    options.cloud_url_options(group)
    group = p.add_argument_group("state")
    group.add_argument(
        "--state",
        metavar="FILE",
        default=None,
        help="where sessions are kept across restarts: a SQLite file (or sqlite:///path), or memory "
        "(forgotten on restart); default: ui-sessions.sqlite3 in $DIFFUSIONX_STATE_DIR, else "
        "$XDG_STATE_HOME/diffusionx or ~/.local/state/diffusionx (the directory `diffusionx serve` uses)",
    )
    group.add_argument(
        "--session-max-age",
        type=_days,
        metavar="DAYS",
        default=7.0,
        help="a stored session is deleted this many days after its last change",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=options.lazy("diffusionx.ui.app", "run_ui"))
