"""Running the service: `diffusionx serve` (uvicorn, or Ray Serve with --ray) and a thread helper."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app, load_tokens
from .config import Limits, resolve_device, store_location

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read deadline: a connection must deliver a complete
    request line and headers within `config.header_timeout_s` of opening (or of the previous
    response), else it is closed. uvicorn alone closes only idle keep-alive connections, and any
    byte received cancels even that timer, so a client sending its headers a byte at a time
    (slowloris) held a connection for ever. The header size limit is h11's
    (`h11_max_incomplete_event_size`: a bigger head is a 400 and a closed connection)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s: float | None = getattr(self.config, "header_timeout_s", None)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._cancel_once_headers_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # waiting for the next request's headers
            self._arm_header_timer()
            self._cancel_once_headers_arrived()  # a pipelined request may be in already

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if self.header_timeout_s:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_once_headers_arrived(self) -> None:
        if self._header_timer is not None and self._serving() and self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._serving():
            return
        log.info(
            "closed a connection from %s: no complete request headers within %g s", self.client, self.header_timeout_s
        )
        self.transport.close()


def uvicorn_config(app, limits: Limits, **kwargs) -> uvicorn.Config:
    """uvicorn's settings from the service limits: the h11 protocol with the header deadline and
    size limit, the keep-alive timeout, the connection limit, and the drain deadline."""
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol,
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        # uvicorn refuses a request once open connections (its own included) reach the limit
        limit_concurrency=limits.max_connections + 1,
        timeout_graceful_shutdown=limits.drain_timeout_s,
        **kwargs,
    )
    config.header_timeout_s = limits.header_timeout_s  # read by GuardedH11Protocol
    return config


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain that can be seen and that ends in time. On the first SIGTERM/SIGINT:

    1. the service drains at once: /v1/health answers 503 {"status": "draining"}, new refinements
       503 + Retry-After (also requests still uploading their body), while the listener stays
       open, until the refinements in flight are done (and at least `drain_linger_s` passed);
    2. then uvicorn stops listening, closes idle connections and waits for the rest, until the
       drain deadline at most, and cancels what is left (a stalled client cannot hold it);
       refinements that cannot finish in time are answered 503 `draining` just before;
    3. the app's shutdown finishes (or, past the deadline, abandons) accepted refinements.

    All of it within `drain_s` of the signal (`hard_deadline`: a watchdog ends the process there,
    whatever hangs). A second signal skips the wait (SIGINT twice: uvicorn's force exit)."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_s: float | None = None,
        linger_s: float = 0.0,
        hard_deadline: bool = False,
    ):
        super().__init__(config)
        self.drain_s = float(drain_s if drain_s is not None else (config.timeout_graceful_shutdown or 30.0))
        self.linger_s = float(linger_s)
        self.hard_deadline = hard_deadline
        self.drain_started: float | None = None
        # stop listening this long before the deadline: uvicorn's own steps and the app's shutdown
        self._margin = min(1.0, 0.1 * self.drain_s)

    @property
    def service(self):
        state = getattr(self.config.app, "state", None)
        return getattr(state, "service", None) if state is not None else None

    def handle_exit(self, sig, frame) -> None:
        service = self.service
        if service is None or self.drain_started is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn once it has shut down
        self.begin_drain()

    def begin_drain(self) -> None:
        """Step 1 (also for tests, which cannot signal a server thread)."""
        self.drain_started = time.monotonic()
        service = self.service
        if service is not None:
            # refinements still running then are answered 503 (retry elsewhere), while there is time
            service.begin_drain(self.drain_started + self.drain_s - 2 * self._margin)
        log.warning("draining: finishing the refinements in flight, exiting within %g s", self.drain_s)
        if self.hard_deadline:
            watchdog = threading.Timer(self.drain_s, _overdue, args=(self.drain_s,))
            watchdog.daemon = True
            watchdog.start()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            elapsed = time.monotonic() - self.drain_started
            service = self.service
            done = service is None or not service.busy()
            if (done and elapsed >= self.linger_s) or elapsed >= self.drain_s - self._margin:
                # uvicorn's graceful shutdown gets what is left of the deadline
                self.config.timeout_graceful_shutdown = max(0.1, self.drain_s - self._margin - elapsed)
                self.should_exit = True
        return await super().on_tick(counter)


def _overdue(seconds: float) -> None:
    print(f"the drain took longer than {seconds:g} s; exiting now", file=sys.stderr, flush=True)
    os._exit(1)


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 60.0, limits: Limits | None = None
) -> RunningServer:
    """Serve `app` on a background thread (tests, benchmarks). Port 0 picks a free port. The
    refinement service (`create_app`) is served with the HTTP limits of its `Limits` (or
    `limits`), as `diffusionx serve` does; other apps (the web UI) with uvicorn's defaults."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    service = getattr(getattr(app, "state", None), "service", None)
    if limits is None and isinstance(getattr(service, "limits", None), Limits):
        limits = service.limits
    if limits is not None:
        config = uvicorn_config(app, limits, log_level="warning", lifespan="on")
        config.timeout_graceful_shutdown = graceful_timeout
        server = DrainingServer(config, drain_s=limits.drain_timeout_s, linger_s=limits.drain_linger_s)
    else:
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
            "burst": args.burst,
            "target_p95_s": args.target_p95,
            "header_timeout_s": args.header_timeout,
            "body_timeout_s": args.body_timeout,
            "keep_alive_s": args.keep_alive,
            "max_header_bytes": args.max_header_bytes,
            "max_connections": args.max_connections,
            "drain_timeout_s": args.drain_seconds,
            "drain_linger_s": args.drain_linger,
            "idempotency_lease_s": args.idempotency_lease,
            "idempotency_window_s": args.idempotency_window,
            "idempotency_keys_per_token": args.idempotency_keys,
        }
    )


def check_limits(limits: Limits) -> None:
    """The HTTP limits `diffusionx serve` takes: positive, and a linger inside the drain deadline."""
    from ..errors import InvalidInputError

    positive = {
        "--header-timeout": limits.header_timeout_s,
        "--body-timeout": limits.body_timeout_s,
        "--keep-alive": limits.keep_alive_s,
        "--max-header-bytes": limits.max_header_bytes,
        "--max-connections": limits.max_connections,
        "--drain-seconds": limits.drain_timeout_s,
        "--idempotency-lease": limits.idempotency_lease_s,
        "--burst": limits.burst,
    }
    if limits.target_p95_s is not None:
        positive["--target-p95"] = limits.target_p95_s
    bad = [f"{flag} {value:g}" for flag, value in positive.items() if not value > 0]
    if bad:
        raise InvalidInputError(f"these must be > 0: {', '.join(bad)}")
    if limits.max_header_bytes < 1024:
        raise InvalidInputError(f"--max-header-bytes must be at least 1024, got {limits.max_header_bytes}")
    if not 0 <= limits.drain_linger_s < limits.drain_timeout_s:
        raise InvalidInputError(
            f"--drain-linger must be >= 0 and below --drain-seconds ({limits.drain_timeout_s:g}), "
            f"got {limits.drain_linger_s:g}"
        )


def open_serve_store(args, limits: Limits):
    """The idempotency store `diffusionx serve` uses (checked at start: a bad URL or an unreachable
    Redis is bad input, not a failure at the first request); says where it is on stderr."""
    from ..errors import InvalidInputError
    from .service import store_settings
    from .store import open_store

    location = store_location(args.store, args.state_dir)
    try:
        store = open_store(location, **store_settings(limits))
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
    if args.switch_interval < 0:
        raise InvalidInputError(f"--switch-interval must be >= 0 milliseconds, got {args.switch_interval}")
    if args.idempotency_keys < 1 or not args.idempotency_window > 0:
        raise InvalidInputError("--idempotency-keys must be >= 1 and --idempotency-window > 0")
    limits = limits_from_args(args)
    check_limits(limits)
    store, location = open_serve_store(args, limits)
    if args.ray:
        from .ray_serve import run_ray

        store.close()  # each replica opens its own connection to the same store
        return run_ray(args, tokens=tokens, limits=limits, store=location)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval / 1000)
    from ..models import load_pair

    # the service refines finals: it never decodes an edge preview
    pair = load_pair(args.model, cloud=args.cloud, device=resolve_device(args.device), preview_decoder=None)
    print(f"cloud model: {pair.cloud_info.label}", file=sys.stderr)
    app = create_app(
        pair.cloud, tokens=tokens, insecure=args.insecure, max_batch=args.max_batch, limits=limits, store=location
    )
    store.close()  # create_app opened its own, closed when the server drains
    if args.insecure and not tokens:
        print("WARNING: --insecure: any client that can reach this port may use it", file=sys.stderr)
    config = uvicorn_config(app, limits, host=args.host, port=args.port)
    DrainingServer(config, drain_s=limits.drain_timeout_s, linger_s=limits.drain_linger_s, hard_deadline=True).run()
    return 0
