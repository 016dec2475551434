"""Service limits and the `diffusionx serve` options. Light: no web framework imported here, so
`diffusionx --help` works without the `serve` extras installed."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

STATE_DIR_ENV = "DIFFUSIONX_STATE_DIR"


@dataclass
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024  # whole JSON body, base64 included
    max_prompt_chars: int = 1000
    max_steps: int = 100
    max_concurrent_per_token: int = 4  # requests in flight per token
    rate_per_minute: float = 120.0  # sustained requests per minute per token
    burst: int = 20  # requests a token may send at once before the rate applies
    max_queue: int = 256  # accepted requests waiting for a batch slot
    # admission (guards.admission_refusal): refuse (429 overloaded) a refinement predicted to take
    # longer than this end to end, rather than queue it; None: off (queue up to max_queue)
    target_p95_s: float | None = None
    # the idempotency store (server/store.py): (token, Idempotency-Key) -> the request and its result
    idempotency_keys_per_token: int = 1024  # each token's own capacity; its oldest results go first
    idempotency_window_s: float = 24 * 3600.0  # a result is replayed for this long after it finished
    idempotency_lease_s: float = 15.0  # a claim lapses this long after its replica stops renewing it
    idempotency_wait_s: float = 30.0  # how long a retry waits for another replica computing its key
    # the HTTP server (diffusionx serve; server/run.py): what one client can hold
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0  # longest pause between two pieces of a request body (408 after it)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # request line + headers; more is a 400 and a closed connection
    max_connections: int = 512  # open connections (uvicorn limit_concurrency); past it requests get 503
    # SIGTERM: health 503 and new work 503 at once, in-flight refinements finish, and the process
    # is gone within drain_timeout_s (Kubernetes' 30 s grace period minus a margin)
    drain_timeout_s: float = 25.0
    drain_linger_s: float = 0.0  # keep listening (health 503) at least this long after SIGTERM


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `diffusionx serve` options (diffusionx.cli.serve registers them)."""
    from ..presets import PRESETS

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", default="embedded", choices=sorted(PRESETS), help="model pair preset (its cloud side)")
    p.add_argument("--cloud-model", dest="cloud", help="cloud model: an HF id or a diffusers folder")
    p.add_argument("--tokens", metavar="FILE", help="bearer tokens, one per line (also: $DIFFUSIONX_TOKENS)")
    p.add_argument("--insecure", action="store_true", help="accept requests without a token (local use only)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests sharing one U-Net call (default 8)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=Limits.max_concurrent_per_token,
        help=f"refinements in flight per token (default {Limits.max_concurrent_per_token})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=Limits.rate_per_minute,
        help=f"refinements per minute per token (default {Limits.rate_per_minute:g})",
    )
    p.add_argument("--max-body", type=int, default=Limits.max_body_bytes, help="request body limit in bytes")
    p.add_argument(
        "--burst",
        type=int,
        default=Limits.burst,
        help=f"refinements a token may send at once before --rate applies (default {Limits.burst})",
    )
    p.add_argument(
        "--target-p95",
        type=float,
        metavar="SECONDS",
        default=Limits.target_p95_s,
        help="keep the p95 end-to-end time under this: a refinement predicted to take longer (the queue's "
        "estimated wait plus its own steps) is refused with 429 and a Retry-After, unless it can start at "
        "once (default: off, requests queue)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        default=Limits.header_timeout_s,
        help=f"a request's line and headers must arrive within this, else the connection is closed "
        f"(slow clients, slowloris; default {Limits.header_timeout_s:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        default=Limits.body_timeout_s,
        help=f"longest pause while a request body arrives, else 408 (default {Limits.body_timeout_s:g})",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        metavar="SECONDS",
        default=Limits.keep_alive_s,
        help=f"idle keep-alive connections are closed after this (default {Limits.keep_alive_s:g})",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        metavar="BYTES",
        default=Limits.max_header_bytes,
        help=f"request line and headers at most this big, else 400 and close (default {Limits.max_header_bytes})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        default=Limits.max_connections,
        help=f"open connections; past this requests get 503 (default {Limits.max_connections})",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        metavar="SECONDS",
        default=Limits.drain_timeout_s,
        help="on SIGTERM: health and new refinements answer 503, in-flight ones finish, and the process exits "
        f"within this many seconds, stalled clients or not (default {Limits.drain_timeout_s:g}: Kubernetes' "
        "30 s grace period minus a margin)",
    )
    p.add_argument(
        "--drain-linger",
        type=float,
        metavar="SECONDS",
        default=Limits.drain_linger_s,
        help="on SIGTERM keep listening (health 503 'draining') at least this long, so load balancers see it "
        f"(default {Limits.drain_linger_s:g}: until the in-flight refinements are done)",
    )
    p.add_argument("--device", default="auto", help="torch device for the model: auto (cuda if present), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument(
        "--switch-interval", type=float, default=0.0, metavar="MS",
        help="Python's GIL switch interval in milliseconds (0: Python's 5 ms). The step loop's U-Net gives the GIL "
        "up at every torch op; while the HTTP threads hold it, the step waits up to this long each time (0.2 ms "
        "measured no change in the load test: docs/serving.md)",
    )
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'ray[serve]')")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray; default 1)")
    p.add_argument(
        "--max-replicas", type=int, default=0, help="with --ray: autoscale between --replicas and this many replicas"
    )
    p.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (default: start a local one)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help=f"where the server keeps its state, e.g. the idempotency store (default: ${STATE_DIR_ENV}, "
        "else $XDG_STATE_HOME/diffusionx or ~/.local/state/diffusionx)",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="idempotency store: a SQLite file or sqlite:///path, redis://host:port/db (shared by several "
        "replicas or machines), or memory (forgotten on restart); default: idempotency.sqlite3 in --state-dir",
    )
    p.add_argument(
        "--idempotency-window",
        type=float,
        metavar="SECONDS",
        default=Limits.idempotency_window_s,
        help="seconds a result is replayed for its Idempotency-Key (24 h)",
    )
    p.add_argument(
        "--idempotency-keys",
        type=int,
        metavar="N",
        default=Limits.idempotency_keys_per_token,
        help="Idempotency-Keys kept per token; its own oldest results go first",
    )
    p.add_argument(
        "--idempotency-lease",
        type=float,
        metavar="SECONDS",
        default=Limits.idempotency_lease_s,
        help="a claim of a process that died lapses this long after its last renewal; a retry then computes "
        f"the request (default {Limits.idempotency_lease_s:g})",
    )


def default_state_dir() -> Path:
    """$DIFFUSIONX_STATE_DIR, else $XDG_STATE_HOME/diffusionx, else ~/.local/state/diffusionx."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser() / "diffusionx"


def store_location(store: str | None, state_dir: str | os.PathLike | None) -> str:
    """The idempotency store `diffusionx serve` opens: --store, else the SQLite file in the state dir."""
    if store:
        return store
    directory = Path(state_dir).expanduser() if state_dir else default_state_dir()
    return str(directory / "idempotency.sqlite3")


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
