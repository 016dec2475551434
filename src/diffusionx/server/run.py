"""Running the service: `diffusionx serve` (uvicorn, or Ray Serve with --ray) and a thread helper."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields

import uvicorn

from .app import create_app, load_tokens
from .config import Limits, resolve_device, store_location

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, but on SIGINT/SIGTERM the service first answers 503 + Retry-After to new requests
    (on connections still open), then uvicorn stops accepting and waits for in-flight requests, and
    the app's shutdown finishes every accepted refinement."""

    def handle_exit(self, sig, frame) -> None:
        service = getattr(self.config.app, "state", None) and self.config.app.state.service
        if service is not None:
            service.draining = True
        super().handle_exit(sig, frame)


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 60.0) -> RunningServer:
    """Serve `app` on a background thread (tests, benchmarks). Port 0 picks a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout, lifespan="on")
    server = DrainingServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    bound_port = sock.getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound_port}")


def limits_from_args(args) -> Limits:
    base = Limits()
    return Limits(
        **{
            **{f.name: getattr(base, f.name) for f in fields(Limits)},
            "max_concurrent_per_token": args.max_concurrent,
            "rate_per_minute": args.rate,
            "max_body_bytes": args.max_body,
            "idempotency_window_s": args.idempotency_window,
            "idempotency_keys_per_token": args.idempotency_keys,
        }
    )


def open_serve_store(args, limits: Limits):
    """The idempotency store `diffusionx serve` uses (checked at start: a bad URL or an unreachable
    Redis is bad input, not a failure at the first request); says where it is on stderr."""
    from ..errors import InvalidInputError
    from .app import _store_settings
    from .store import open_store

    location = store_location(args.store, args.state_dir)
    try:
        store = open_store(location, **_store_settings(limits))
    except Exception as err:
        raise InvalidInputError(f"cannot open the idempotency store {location}: {err}") from None
    print(
        f"idempotency store: {store.describe()} ({limits.idempotency_keys_per_token} keys per token, "
        f"window {limits.idempotency_window_s:g} s)",
        file=sys.stderr,
    )
    return store, location


def cmd_serve(args) -> int:
    from ..errors import InvalidInputError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = load_tokens(args.tokens)
    if not tokens and not args.insecure:
        raise InvalidInputError(
            "no API tokens: pass --tokens FILE or set DIFFUSIONX_TOKENS=token1,token2; or, for local use "
            "only, add --insecure to accept unauthenticated requests"
        )
    if args.max_batch < 1:
        raise InvalidInputError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.idempotency_keys < 1 or not args.idempotency_window > 0:
        raise InvalidInputError("--idempotency-keys must be >= 1 and --idempotency-window > 0")
    limits = limits_from_args(args)
    store, location = open_serve_store(args, limits)
    if args.ray:
        from .ray_serve import run_ray

        store.close()  # each replica opens its own connection to the same store
        return run_ray(args, tokens=tokens, limits=limits, store=location)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..models import load_pair

    pair = load_pair(args.model, cloud=args.cloud, device=resolve_device(args.device))
    print(f"cloud model: {pair.cloud_info.label}", file=sys.stderr)
    app = create_app(
        pair.cloud, tokens=tokens, insecure=args.insecure, max_batch=args.max_batch, limits=limits, store=location
    )
    store.close()  # create_app opened its own, closed when the server drains
    if args.insecure and not tokens:
        print("WARNING: --insecure: any client that can reach this port may use it", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=int(limits.drain_timeout_s))
    DrainingServer(config).run()
    return 0
