"""`diffusionx ui`: build the UI's state from the command line and serve it (uvicorn). The state
lives in `diffusionx.ui.state`, the routes in `diffusionx.ui.routes`; both are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from ..errors import InvalidInputError
from .routes import create_app
from .state import SESSION_FORMAT, UIState

__all__ = ["SESSION_FORMAT", "UIState", "build_state", "create_app", "open_ui_store", "run_ui", "ui_store_location"]
from .store import (
    SQLiteSessionStore,
)

log = logging.getLogger(__name__)


# ----- `diffusionx ui` ----------------------------------------------------------------------------
def build_state(args) -> UIState:
    import sys

    from ..cli.options import chosen_policy_spec, make_policy
    from ..cli.runtime import preview_decoder_arg
    from ..models import load_pair
    from ..predictors.specs import is_predictor_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair(args.model, edge=args.edge, cloud=args.cloud, preview_decoder=preview_decoder_arg(args))
    print(f"models: edge {pair.edge_info.label}, cloud {pair.cloud_info.label}", file=sys.stderr)
    cloud, label = None, "in-process"
    if args.cloud_url:
        from ..client import CloudClient

        token = args.token or os.environ.get("DIFFUSIONX_TOKEN")
        cloud = CloudClient(args.cloud_url, token, retries=2, backoff=0.25, connect_timeout=3.0)
        label = args.cloud_url
    # A fixed spec gives the page's "fixed" its strengths; any other is what a new tab starts with.
    spec = chosen_policy_spec(args, pair)
    fixed_spec, default = ("fixed", spec) if is_predictor_spec(spec) else (spec, "fixed")
    fixed = make_policy(args, pair, fixed_spec)[1]
    store = open_ui_store(getattr(args, "state", None), getattr(args, "session_max_age", None))
    return UIState(pair, cloud=cloud, cloud_label=label, policy=fixed, default_policy=default, steps=args.steps,
                   seed=args.seed, store=store)


def ui_store_location(state: str | None) -> str:
    """`--state`: as given, else ui-sessions.sqlite3 in the state directory `diffusionx serve` uses."""
    from ..server.config import default_state_dir
    from .store import STORE_FILE_NAME

    return state or str(default_state_dir() / STORE_FILE_NAME)


def open_ui_store(state: str | None, max_age_days: float | None = None) -> SQLiteSessionStore | None:
    """The session store `diffusionx ui` opens (None for `--state memory`), checked at start: a file
    that cannot be opened is bad input (exit 2); says where the sessions are on stderr."""
    import sys

    from .store import DEFAULT_MAX_AGE_S, open_session_store

    location = ui_store_location(state)
    days = DEFAULT_MAX_AGE_S / 86400 if max_age_days is None else max_age_days
    if not (isinstance(days, (int, float)) and math.isfinite(days) and days > 0):
        raise InvalidInputError(f"--session-max-age must be a positive number of days, got {days!r}")
    try:
        store = open_session_store(location, max_age_s=days * 86400)
    except Exception as err:
        raise InvalidInputError(f"cannot open the UI's session store {location}: {err}") from None
    if store is None:
        print("sessions: memory (this process only; a restart forgets them)", file=sys.stderr)
    else:
        print(f"sessions: {store.describe()} (each kept {days:g} days after its last change)", file=sys.stderr)
    return store


def run_ui(args) -> int:
    import uvicorn

    state = build_state(args)
    if not math.isfinite(args.port) or not 0 <= args.port <= 65535:
        raise InvalidInputError(f"port must be in 0-65535, got {args.port}")
    print(f"DiffusionX UI on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        if state.store is not None:
            state.store.close()
    return 0
