"""The HTTP refinement service (FastAPI): `create_app(engine_or_refiner, ...)`.

Endpoints (docs/serving.md has the schemas and examples):

- `POST /v1/refine`   JSON body; returns the refined latent (safetensors) or PNG, base64, with timings
- `GET  /v1/health`   liveness/readiness (503 while draining)
- `GET  /v1/load`     queue depth, running batch, recent step time, estimated wait
- `GET  /metrics`     Prometheus text format
- `GET  /openapi.json`

Order of checks on /v1/refine: draining (503) -> auth (401/403) -> Content-Type (415) -> body size
(413, before any parsing, also for chunked bodies) -> JSON and base64 (400) -> fields (422, strict:
no "0.5" or true for numbers) -> idempotent replay -> quotas (429) -> queue (503). Client data is
parsed only as JSON, safetensors and PNG: never pickle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..cloud import CloudRefiner, RefineRequest, RefineResult, check_request, result_problem
from ..engine import SCHEDULERS, Engine
from ..errors import InvalidInputError
from ..wire import NonFiniteResultError, PayloadError
from .batching import BatchingRefiner, LoadReport, ServiceUnavailableError
from .config import Limits
from .schemas import IDEMPOTENCY_KEY_MAX, ErrorResponse, RefineBody, RefineResponse, error_body
from .store import Entry, IdempotencyStore, MemoryStore, open_store, request_fingerprint

log = logging.getLogger(__name__)
TOKENS_ENV = "DIFFUSIONX_TOKENS"
KNOWN_PATHS = frozenset({"/v1/refine", "/v1/health", "/v1/load", "/metrics", "/openapi.json", "/docs"})


# ----- configuration ----------------------------------------------------------------------------
def load_tokens(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> set[str]:
    """Bearer tokens from a file (one per line, '#' comments) and/or $DIFFUSIONX_TOKENS (comma-separated)."""
    tokens: set[str] = set()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise InvalidInputError(f"tokens file {file} does not exist; write one token per line")
        for line in file.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.add(line)
    raw = (os.environ if env is None else env).get(TOKENS_ENV, "")
    tokens.update(t.strip() for t in raw.split(",") if t.strip())
    for token in tokens:
        if len(token) < 8 or any(c.isspace() for c in token):
            raise InvalidInputError("tokens must be at least 8 characters without spaces")
    return tokens


# ----- errors -----------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# ----- quotas and idempotency -------------------------------------------------------------------
class _Quota:
    """Per-token token bucket (rate) and in-flight counter (concurrency)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._inflight: defaultdict[str, int] = defaultdict(int)

    def acquire(self, who: str, until_one_finishes: Callable[[], float | None]) -> None:
        """Count a request in, or 429. `until_one_finishes()` estimates when one of this token's
        requests in flight is done: the honest Retry-After for a token at its concurrency limit."""
        limits = self.limits
        with self._lock:
            inflight = self._inflight[who]
            if inflight < limits.max_concurrent_per_token:
                rate = limits.rate_per_minute / 60.0
                now = time.monotonic()
                level, last = self._buckets.get(who, (float(limits.burst), now))
                level = min(float(limits.burst), level + (now - last) * rate)
                if level < 1.0:
                    self._buckets[who] = (level, now)
                    raise ApiError(
                        429,
                        "rate_limited",
                        f"rate limit of {limits.rate_per_minute:g} refinements per minute per token reached",
                        _retry_after((1.0 - level) / rate if rate > 0 else 60.0),
                    )
                self._buckets[who] = (level - 1.0, now)
                self._inflight[who] += 1
                return
        # At the concurrency limit. Estimated outside the lock: it asks the refiner, whose lock may
        # be held while a future's callbacks (release) run.
        wait = until_one_finishes()
        when = f"one should finish in about {wait:.1f} s" if wait is not None else "no step timed yet"
        raise ApiError(
            429,
            "too_many_concurrent",
            f"this token already has {inflight} refinements in flight (limit {limits.max_concurrent_per_token}); "
            f"wait for one to finish ({when})",
            _retry_after(1.0 if wait is None else wait),
        )

    def release(self, who: str) -> None:
        with self._lock:
            self._inflight[who] -= 1


@dataclass
class _Local:
    """A keyed request this process is settling: the first handler for (token, key) settles it
    (from the store, or by computing), concurrent ones with the same key wait on `outcome`: a
    Future of (response body, replayed from the store)."""

    fingerprint: str
    outcome: Future
    owned: bool = False  # holds the store's pending claim: its lease is renewed until it is settled


class _SerialRefiner:
    """Adapts any blocking `Refiner` (e.g. CloudRefiner) to submit/load: one request at a time."""

    def __init__(self, refiner: Any):
        self.refiner = refiner
        self.engine = getattr(refiner, "engine", None)
        self.max_batch = 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="diffusionx-refiner")
        self._waiting = 0
        self._lock = threading.Lock()
        self.completed = self.failed = self.unet_calls = 0
        self._closing = False
        self._order: list[Future] = []  # submitted and not yet done, first come first served
        self._running_since = 0.0
        self._mean_s = 0.0  # moving average of one refinement's wall time

    def submit(self, request: RefineRequest) -> Future:
        request.validate()
        if self._closing:
            raise ServiceUnavailableError("the refiner is shutting down", 5.0)
        with self._lock:
            self._waiting += 1
        submitted = time.perf_counter()

        def run() -> RefineResult:
            started = time.perf_counter()
            with self._lock:
                self._waiting -= 1
                self._running_since = started
            queue_s = started - submitted
            try:
                result = self.refiner.refine(request)
            except Exception:
                self.failed += 1
                raise
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._mean_s = elapsed if not self._mean_s else 0.8 * self._mean_s + 0.2 * elapsed
            result.queue_s = queue_s
            self.completed += 1
            self.unet_calls += result.unet_steps
            result.seq = self.completed  # type: ignore[attr-defined]
            return result

        future = self._pool.submit(run)
        with self._lock:
            self._order.append(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            if future in self._order:
                self._order.remove(future)

    def finish_estimate_s(self, futures: Iterable[Future]) -> float | None:
        """Seconds until the first of these is done: its place in line times the mean refinement."""
        wanted = set(futures)
        with self._lock:
            places = [i for i, f in enumerate(self._order) if f in wanted]
            if not places or not self._mean_s:
                return None
            elapsed = time.perf_counter() - self._running_since if self._order and self._order[0].running() else 0.0
            return max(0.0, (places[0] + 1) * self._mean_s - elapsed)

    def load(self) -> LoadReport:
        return LoadReport(self._waiting, 0, 1, 0.0, 0.0, self.completed, self.failed, self.unet_calls, self._closing)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._order

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        self._closing = True
        self._pool.shutdown(wait=drain, cancel_futures=not drain)
        return True


# ----- the service ------------------------------------------------------------------------------
class Service:
    """State behind one app: the refiner, auth, quotas, idempotency, counters, draining."""

    def __init__(
        self,
        refiner: Any,
        *,
        tokens: set[str],
        insecure: bool,
        limits: Limits,
        replica: str,
        store: IdempotencyStore,
        owns_store: bool = True,
    ):
        self.refiner = refiner
        self.engine: Engine | None = getattr(refiner, "engine", None)
        self._contract = isinstance(refiner, BatchingRefiner) or isinstance(
            getattr(refiner, "refiner", None), CloudRefiner
        )  # its results come from CloudRefiner.finish
        self.tokens = set(tokens)
        # Compared as UTF-8 bytes: hmac.compare_digest raises on str with non-ASCII characters.
        self._token_bytes = [token.encode("utf-8") for token in self.tokens]
        self.insecure = insecure
        self.limits = limits
        self.replica = replica
        self.quota = _Quota(limits)
        self._inflight_futures: defaultdict[str, set[Future]] = defaultdict(set)  # per identity
        self.store = store
        self._owns_store = owns_store
        self.owner = f"{replica}/{uuid.uuid4().hex[:12]}"  # this process's claims in the store
        self._local: dict[tuple[str, str], _Local] = {}  # keyed requests this process is settling
        # Result handling (base64, NaN check, the store's write) off the refiner's worker thread;
        # claims and waits for another replica's result in their own threads, off the event loop.
        self._results = ThreadPoolExecutor(2, thread_name_prefix="diffusionx-results")
        self._claims = ThreadPoolExecutor(16, thread_name_prefix="diffusionx-claims")
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain must be done
        self.active = 0  # refinements in flight: accepted requests whose answer is not out yet
        self.started = time.time()
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.latency_buckets = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
        self.latency_counts = [0] * len(self.latency_buckets)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.replays = 0
        self.client_disconnects: defaultdict[str, int] = defaultdict(int, {"/v1/refine": 0})
        self._lock = threading.Lock()

    # auth: returns an identity for quotas/idempotency (a hash: the token itself is never stored twice)
    def authenticate(self, header: str | None) -> str:
        if not self.tokens:
            return "anonymous"
        if not header:
            raise ApiError(
                401, "unauthorized", "missing 'Authorization: Bearer <token>' header", {"WWW-Authenticate": "Bearer"}
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "unauthorized", "the Authorization header must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        # Starlette decodes header bytes as latin-1; re-encoding gives the bytes the client sent
        # (so a UTF-8 token in the tokens file matches a client sending it as UTF-8).
        raw = token.encode("latin-1", errors="replace")
        matched = False
        for known in self._token_bytes:  # every token compared: the time does not say which one is close
            matched |= hmac.compare_digest(raw, known)
        if not matched:
            raise ApiError(
                403,
                "forbidden",
                f"this token is not accepted by this server; check --tokens / {TOKENS_ENV} on the server",
            )
        return hashlib.sha256(raw).hexdigest()[:16]

    def check_draining(self) -> None:
        if self.draining:
            raise _draining()

    def begin_drain(self, deadline: float | None = None) -> None:
        """Draining from now on (health 503, new work 503); `deadline` (monotonic) bounds the
        rest of the drain, the app's shutdown included."""
        self.drain_deadline = deadline
        self.draining = True

    def busy(self) -> bool:
        """Refinements in flight: accepted requests not yet answered, or work the refiner still
        runs (e.g. for a client that hung up: its retry will want the stored result)."""
        if self.active:
            return True
        idle = getattr(self.refiner, "idle", None)
        if idle is not None:
            return not idle
        load = self.refiner.load()
        return bool(load.queue_depth or load.running)

    def observe(self, path: str, status: int, seconds: float) -> None:
        if path not in KNOWN_PATHS:
            path = "other"
        with self._lock:
            self.requests[(path, status)] += 1
            if path == "/v1/refine" and status == 200:
                self.latency_sum += seconds
                self.latency_n += 1
                for i, bound in enumerate(self.latency_buckets):
                    if seconds <= bound:
                        self.latency_counts[i] += 1

    def observe_disconnect(self, path: str) -> None:
        """A client hung up before its request was read: its fault, not a server error."""
        with self._lock:
            self.client_disconnects[path if path in KNOWN_PATHS else "other"] += 1

    def load(self) -> LoadReport:
        return self.refiner.load()

    def track(self, who: str, future: Future) -> None:
        with self._lock:
            self._inflight_futures[who].add(future)

        def forget(_: Future) -> None:
            with self._lock:
                self._inflight_futures[who].discard(future)

        future.add_done_callback(forget)

    def until_one_finishes(self, who: str) -> float | None:
        """When one of `who`'s refinements in flight should be done, from the queue and step times."""
        with self._lock:
            futures = list(self._inflight_futures.get(who, ()))
        estimate = getattr(self.refiner, "finish_estimate_s", None)
        return estimate(futures) if estimate is not None and futures else None

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting (503 + Retry-After) and finish every accepted request (and store it)."""
        self.draining = True
        if timeout is None:
            timeout = self.limits.drain_timeout_s
            if self.drain_deadline is not None:
                timeout = max(0.0, self.drain_deadline - time.monotonic())
        finished = self.refiner.close(drain=True, timeout=timeout)
        if not finished:  # abandoned work: free its keys, so that a retry elsewhere computes at once
            with self._lock:
                owned = [k for k, local in self._local.items() if local.owned]
            for who, key in owned:
                self._release(who, key)
        self._results.shutdown(wait=finished)
        self._claims.shutdown(wait=False)
        self._stop_renewing.set()
        if self._owns_store and finished:
            with contextlib.suppress(Exception):
                self.store.close()
        return finished

    # ----- computing, and idempotency through the store -----------------------------------------
    def compute(self, who: str, request: RefineRequest, request_id: str) -> Future:
        """Quota, then the refiner: a Future of the response body (an ApiError if it failed)."""
        self.quota.acquire(who, lambda: self.until_one_finishes(who))
        try:
            future = self.refiner.submit(request)
        except ServiceUnavailableError as err:
            self.quota.release(who)
            raise ApiError(503, "unavailable", str(err), _retry_after(err.retry_after)) from None
        except InvalidInputError as err:
            self.quota.release(who)
            raise ApiError(422, "invalid_input", str(err)) from None
        future.add_done_callback(lambda _: self.quota.release(who))
        self.track(who, future)
        outcome: Future = Future()

        def done(f: Future) -> None:
            try:
                self._results.submit(self._finish, f, request_id, outcome)
            except RuntimeError:  # shut down (a drain that timed out): finish here
                self._finish(f, request_id, outcome)

        future.add_done_callback(done)
        return outcome

    def _finish(self, future: Future, request_id: str, outcome: Future) -> None:
        try:
            result = future.result()
            # A refiner outside the refine contract (whose finish checks every result): never
            # answer its NaN as a success.
            problem = None if self._contract else result_problem(result)
            if problem is not None:
                raise _non_finite(request_id, f"the refinement produced {problem}")
            outcome.set_result(RefineResponse.from_result(result, request_id, self.replica).model_dump())
        except ApiError as err:
            outcome.set_exception(err)
        except InvalidInputError as err:
            outcome.set_exception(ApiError(422, "invalid_input", str(err)))
        except ServiceUnavailableError as err:
            outcome.set_exception(ApiError(503, "unavailable", str(err), _retry_after(err.retry_after)))
        except NonFiniteResultError as err:
            outcome.set_exception(_non_finite(request_id, str(err)))
        except Exception as err:
            log.exception("refinement %s failed", request_id)
            outcome.set_exception(
                ApiError(
                    500,
                    "refinement_failed",
                    f"the refinement failed on the server ({type(err).__name__}); "
                    "retrying may help, the server log has the details",
                )
            )

    def begin(self, who: str, key: str, request: RefineRequest) -> tuple[Future, bool]:
        """A keyed request: (a Future of (body, replayed), joined an earlier one). Blocking (the
        store); call it off the event loop. Raises ApiError for a key reused for another request."""
        fingerprint = request_fingerprint(request)
        k = (who, key)
        with self._lock:
            local = self._local.get(k)
            if local is None:
                local = self._local[k] = _Local(fingerprint, Future())
                mine = True
            else:
                mine = False
        if not mine:
            if local.fingerprint != fingerprint:
                raise _key_reused()
            return local.outcome, True
        try:
            self._settle(who, key, local, request)
        except BaseException as err:
            self._forget(k, local)
            if not local.outcome.done():
                local.outcome.set_exception(err)
        return local.outcome, False

    def _settle(self, who: str, key: str, local: _Local, request: RefineRequest) -> None:
        """Claim (who, key) in the store; replay what it holds, wait for another replica that is
        computing it (until its lease lapses), or compute it and store the result."""
        k = (who, key)
        deadline = time.monotonic() + self.limits.idempotency_wait_s
        pause = 0.05
        while True:
            request_id = uuid.uuid4().hex
            try:
                claim = self.store.claim(who, key, local.fingerprint, request_id, self.owner)
            except Exception as err:
                log.exception("the idempotency store failed on a claim")
                raise ApiError(
                    503,
                    "store_unavailable",
                    f"the idempotency store is unavailable ({type(err).__name__})",
                    _retry_after(5),
                ) from None
            if claim.outcome != "new" and claim.entry.fingerprint != local.fingerprint:
                raise _key_reused()
            if claim.outcome == "done":
                entry = claim.entry
                body = {**entry.meta, "payload": base64.b64encode(entry.payload or b"").decode()}
                local.outcome.set_result((body, True))
                self._forget(k, local)
                return
            if claim.outcome == "new":
                break
            if time.monotonic() > deadline:  # another replica is still on it
                raise ApiError(
                    503,
                    "in_progress",
                    "another replica is computing the request with this Idempotency-Key; retry with the same key",
                    _retry_after(min(5.0, max(1.0, claim.entry.expires - time.time()))),
                )
            time.sleep(pause)
            pause = min(0.5, pause * 2)
        local.owned = True
        self._start_renewing()
        try:
            computed = self.compute(who, request, request_id)
        except BaseException:
            self._release(who, key)
            raise

        def stored(f: Future) -> None:  # in a results thread: store, then answer, then forget
            err = f.exception()
            if err is None:
                body = f.result()
                meta = {name: value for name, value in body.items() if name != "payload"}
                entry = Entry(
                    local.fingerprint,
                    request_id,
                    self.owner,
                    "done",
                    time.time(),
                    0.0,
                    meta,
                    base64.b64decode(body["payload"]),
                )
                try:
                    if not self.store.complete(who, key, self.owner, entry):
                        log.warning("idempotency key of %s was taken by another request; result not stored", who)
                except Exception:
                    log.exception("the idempotency store failed to keep result %s", request_id)
                local.outcome.set_result((body, False))
            else:
                self._release(who, key)
                local.outcome.set_exception(err)
            self._forget(k, local)

        computed.add_done_callback(stored)

    def _release(self, who: str, key: str) -> None:
        try:
            self.store.release(who, key, self.owner)
        except Exception:
            log.exception("the idempotency store failed to release a claim")

    def _forget(self, k: tuple[str, str], local: _Local) -> None:
        with self._lock:
            if self._local.get(k) is local:
                del self._local[k]

    def _start_renewing(self) -> None:
        with self._lock:
            if self._renewer is not None:
                return
            self._renewer = threading.Thread(target=self._renew, daemon=True, name="diffusionx-lease")
        self._renewer.start()

    def _renew(self) -> None:
        """Keep this process's claims alive while it computes them (a killed process's lapse)."""
        while not self._stop_renewing.wait(self.store.lease_s / 3):
            with self._lock:
                owned = [k for k, local in self._local.items() if local.owned]
            for who, key in owned:
                try:
                    self.store.renew(who, key, self.owner)
                except Exception:
                    log.exception("the idempotency store failed to renew a lease")

    # request -> RefineRequest, validating everything that needs no model call
    def to_request(self, body: RefineBody) -> RefineRequest:
        limits = self.limits
        if not body.prompt.strip():
            raise ApiError(422, "invalid_input", "prompt is empty: send the final prompt to refine")
        if len(body.prompt) > limits.max_prompt_chars:
            raise ApiError(
                422,
                "prompt_too_long",
                f"prompt is {len(body.prompt)} characters; this server takes at most {limits.max_prompt_chars}",
            )
        if body.steps > limits.max_steps:
            raise ApiError(
                422, "invalid_input", f"steps must be at most {limits.max_steps} on this server, got {body.steps}"
            )
        if (body.latent is None) == (body.image is None):
            raise ApiError(
                422, "invalid_input", "send exactly one of 'latent' (base64 safetensors) or 'image' (base64 PNG)"
            )
        try:
            request = body.to_request()
            # the refine contract's own checks (the payload parsed here, once, for everything after)
            check_request(request, self.engine)
        except PayloadError as err:
            raise ApiError(400 if err.code in ("bad_payload", "bad_base64") else 422, err.code, str(err)) from None
        except InvalidInputError as err:
            raise ApiError(422, "invalid_input", str(err)) from None
        return request

    @property
    def model_name(self) -> str:
        return self.engine.name if self.engine is not None else "unknown"

    @property
    def latent_shape(self) -> list[int] | None:
        return list(self.engine.latent_shape()) if self.engine is not None else None


def _key_reused() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was used for a different request; use a fresh key per distinct request",
    )


def _non_finite(request_id: str, message: str) -> ApiError:
    log.error("refinement %s: %s", request_id, message)
    return ApiError(
        500,
        "non_finite_result",
        f"{message}; the model diverged on this input, so retrying it will not help (request {request_id})",
    )


def _check_content_type(request: Request) -> None:
    value = request.headers.get("content-type")
    if value is None or value.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON sent with 'Content-Type: application/json' (got {value or 'no Content-Type'})",
        )


def _request_schema(limits: Limits) -> dict[str, Any]:
    """RefineBody's JSON schema with this server's limits, so clients and fuzzers see them."""
    schema = RefineBody.model_json_schema()
    props = schema["properties"]
    props["prompt"].update(minLength=1, maxLength=limits.max_prompt_chars)
    props["steps"]["maximum"] = limits.max_steps
    for field in ("latent", "image"):  # base64 inside a body of at most max_body_bytes
        for option in props[field].get("anyOf", [props[field]]):
            if option.get("type") == "string":
                option["maxLength"] = limits.max_body_bytes
    schema["description"] = (
        f"{schema.get('description', '')} The whole body may be at most {limits.max_body_bytes} bytes."
    ).strip()
    return schema


async def _within_drain(service: Service, future: asyncio.Future) -> Any:
    """`future`'s result, or, if a drain's deadline comes first, 503 `draining` (retry with the
    same Idempotency-Key: the claim is released) while the server can still answer. Neither a
    deadline nor a cancelled handler cancels `future` itself."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        deadline = service.drain_deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise ApiError(
                503,
                "draining",
                "the server is shutting down and this refinement did not finish before its drain deadline; "
                "retry (another instance) with the same Idempotency-Key",
                _retry_after(1),
            )


def _draining(headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(
        503,
        "draining",
        "the server is shutting down and accepts no new work; retry (another instance) shortly",
        {**_retry_after(5), **(headers or {})},
    )


async def _read_body(request: Request, limit: int, idle_timeout: float, service: Service | None = None) -> bytes:
    """The body, at most `limit` bytes, each piece within `idle_timeout` s of the previous one
    (else 408). A drain that starts meanwhile ends the upload with 503 at once: the request would
    be refused anyway, and a slow or stalled upload must not hold the shutdown."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(length) > limit:
            raise ApiError(413, "body_too_large", f"request body is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    close = {"Connection": "close"}  # the rest of the body is never read
    while True:
        # receive() itself, not request.stream(): a pending receive can be abandoned without
        # losing data, an async generator interrupted mid-await is finished for good
        receive = asyncio.ensure_future(request.receive())
        quiet_since = time.monotonic()
        while not receive.done():
            await asyncio.wait({receive}, timeout=0.25)
            if receive.done():
                break
            if service is not None and service.draining:
                receive.cancel()
                raise _draining(close)
            if time.monotonic() - quiet_since > idle_timeout:
                receive.cancel()
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body stalled: nothing arrived for {idle_timeout:g} s",
                    close,
                )
        message = receive.result()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes", close)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _validation_message(err: ValidationError) -> tuple[int, str]:
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, "body is not valid JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
    if any(e["type"] == "model_type" for e in errors):
        return 400, "body must be a JSON object with the fields prompt, strength, latent or image, ..."
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return 422, "; ".join(parts)


# ----- the app ----------------------------------------------------------------------------------
def create_app(
    refiner_or_engine: Any,
    *,
    tokens: set[str] | None = None,
    insecure: bool = False,
    max_batch: int = 8,
    limits: Limits | None = None,
    replica: str | None = None,
    store: IdempotencyStore | str | os.PathLike | None = None,
) -> FastAPI:
    """The service around an Engine (gets a continuous batcher of `max_batch`), a BatchingRefiner,
    or any blocking Refiner (run one at a time). Needs tokens unless `insecure` is explicit.

    `store`: the idempotency store: an `IdempotencyStore` (the caller's: not closed here), or what
    `open_store` takes ("memory", a SQLite file, "redis://host:port/db"); default: in memory."""
    limits = limits or Limits()
    tokens = set(tokens or ())
    if not tokens and not insecure:
        raise InvalidInputError(
            f"no API tokens: pass --tokens FILE or set {TOKENS_ENV}=token1,token2; or, for local use only, "
            "run with --insecure to accept unauthenticated requests"
        )
    if isinstance(refiner_or_engine, Engine):
        refiner = BatchingRefiner(refiner_or_engine, max_batch=max_batch, max_queue=limits.max_queue)
    elif hasattr(refiner_or_engine, "submit") and hasattr(refiner_or_engine, "load"):
        refiner = refiner_or_engine
    elif hasattr(refiner_or_engine, "refine"):
        refiner = _SerialRefiner(refiner_or_engine)
    else:
        raise InvalidInputError(f"create_app needs an Engine or a Refiner, got {type(refiner_or_engine).__name__}")
    owns_store = not hasattr(store, "claim")
    if store is None:
        store = MemoryStore(**_store_settings(limits))
    elif owns_store:
        store = open_store(store, **_store_settings(limits))
    service = Service(
        refiner,
        tokens=tokens,
        insecure=insecure,
        limits=limits,
        replica=replica or f"{socket.gethostname()}:{os.getpid()}",
        store=store,
        owns_store=owns_store,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.drain)

    app = FastAPI(
        title="DiffusionX cloud refinement",
        version="1",
        description="Refines an edge preview latent with the cloud model. See docs/serving.md.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(err.status, err.code, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error(err.status_code, code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return _error(
            422, "invalid_input", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        )

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # hung up mid-upload: nobody reads an answer, and it is no 5xx
            service.observe_disconnect(request.url.path)
            return Response(status_code=499)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("unexpected error on %s %s (error id %s)", request.method, request.url.path, error_id)
            response = _error(
                500,
                "internal",
                f"internal server error; the server log has the details (error id {error_id})",
                {"X-Error-Id": error_id},
            )
        service.observe(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    error_responses = {
        status: {"model": ErrorResponse, "description": text}
        for status, text in (
            (400, "body is not JSON, bad base64, unreadable safetensors or PNG"),
            (401, "no or malformed bearer token"),
            (403, "token not accepted"),
            (408, "the body stalled (nothing arrived for the body timeout)"),
            (413, "body larger than the limit"),
            (415, "Content-Type is not application/json"),
            (422, "a field is out of range, or the latent/image does not fit the cloud model"),
            (429, "per-token concurrency or rate quota; see Retry-After"),
            (503, "draining or queue full; see Retry-After"),
        )
    }

    @app.post(
        "/v1/refine",
        response_model=RefineResponse,
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": f"at most {limits.max_body_bytes} bytes",
                "content": {"application/json": {"schema": _request_schema(limits)}},
            },
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
                    "description": "1-200 printable characters; retries with the same key (per token) return "
                    "the first result, computed once",
                },
            ],
            **({"security": [{"bearer": []}]} if service.tokens else {}),
        },
    )
    async def refine(request: Request):
        service.check_draining()
        who = service.authenticate(request.headers.get("authorization"))
        _check_content_type(request)
        raw = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s, service)
        service.check_draining()  # a body that arrived after the drain began is new work too
        service.active += 1  # (on the event loop: no lock needed)
        try:
            return await _refine(request, who, raw)
        finally:
            service.active -= 1

    async def _refine(request: Request, who: str, raw: bytes) -> JSONResponse:
        try:
            body = RefineBody.model_validate_json(raw)
        except ValidationError as err:
            status, message = _validation_message(err)
            raise ApiError(status, "bad_request" if status == 400 else "invalid_input", message) from None
        key = request.headers.get("idempotency-key")
        if key is not None and (not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable()):
            raise ApiError(
                400, "bad_idempotency_key", f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters"
            )
        refine_request = service.to_request(body)
        if key is None:
            outcome, replay = service.compute(who, refine_request, uuid.uuid4().hex), False
        else:
            loop = asyncio.get_running_loop()
            # off the loop (the store is blocking I/O); it settles even if this client hangs up
            joined = loop.run_in_executor(service._claims, service.begin, who, key, refine_request)
            outcome, replay = await _within_drain(service, joined)
        # a client that disconnects does not cancel the work (_within_drain never cancels it): its
        # retry picks it up
        answer = await _within_drain(service, asyncio.wrap_future(outcome))
        if key is not None:
            answer, from_store = answer
            replay = replay or from_store
        headers = {}
        if replay:
            with service._lock:
                service.replays += 1
            headers["Idempotent-Replay"] = "true"
        return JSONResponse(answer, headers=headers)

    def openapi() -> dict[str, Any]:
        """FastAPI's spec plus the bearer scheme (auth is checked in the endpoint, not a dependency)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if service.tokens:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": f"a token from the server's --tokens file or {TOKENS_ENV}",
                    }
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/v1/health")
    async def health():
        body = {
            "status": "draining" if service.draining else "ok",
            "model": service.model_name,
            "latent_shape": service.latent_shape,
            "image_size": service.engine.default_size if service.engine is not None else None,
            "schedulers": list(SCHEDULERS),
            "max_batch": service.refiner.max_batch,
            "auth": "bearer" if service.tokens else "none (--insecure)",
            "replica": service.replica,
            "uptime_s": time.time() - service.started,
        }
        alive = getattr(service.refiner, "alive", True)
        if not alive and not service.draining:
            body["status"] = "failed"
            body["reason"] = f"the refiner's worker stopped: {getattr(service.refiner, 'crashed', None)!r}"
        healthy = alive and not service.draining
        return JSONResponse(body, status_code=200 if healthy else 503, headers=None if healthy else _retry_after(5))

    @app.get("/v1/load")
    async def load():
        return {**service.load().as_dict(), "replica": service.replica}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_prometheus(service), media_type="text/plain; version=0.0.4")

    return app


def _store_settings(limits: Limits) -> dict[str, Any]:
    return {
        "capacity_per_token": limits.idempotency_keys_per_token,
        "window_s": limits.idempotency_window_s,
        "lease_s": limits.idempotency_lease_s,
    }


def _prometheus(service: Service) -> str:
    load = service.load()
    out = io.StringIO()

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.write(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        for labels, value in samples:
            out.write(f"{name}{labels} {value:g}\n" if not math.isinf(value) else f"{name}{labels} +Inf\n")

    with service._lock:
        requests = sorted(service.requests.items())
        buckets = list(zip(service.latency_buckets, service.latency_counts))
        lat_sum, lat_n, replays = service.latency_sum, service.latency_n, service.replays
        disconnects = sorted(service.client_disconnects.items())
    metric(
        "diffusionx_http_requests_total",
        "counter",
        "HTTP requests by path and status",
        [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in requests],
    )
    metric(
        "diffusionx_client_disconnects_total",
        "counter",
        "requests whose client hung up before the body was read (not counted as HTTP requests)",
        [(f'{{path="{p}"}}', n) for p, n in disconnects],
    )
    cumulative, samples = 0, []
    for bound, count in buckets:
        cumulative += count
        le = "+Inf" if math.isinf(bound) else f"{bound:g}"
        samples.append((f'_bucket{{le="{le}"}}', cumulative))
    out.write(
        "# HELP diffusionx_refine_seconds end-to-end latency of successful refinements\n"
        "# TYPE diffusionx_refine_seconds histogram\n"
    )
    for suffix, value in samples:
        out.write(f"diffusionx_refine_seconds{suffix} {value:g}\n")
    out.write(f"diffusionx_refine_seconds_sum {lat_sum:g}\ndiffusionx_refine_seconds_count {lat_n}\n")
    metric("diffusionx_refinements_completed_total", "counter", "refinements finished", [("", load.completed)])
    metric("diffusionx_refinements_failed_total", "counter", "refinements that failed", [("", load.failed)])
    metric(
        "diffusionx_idempotent_replays_total", "counter", "retries answered from the idempotency store", [("", replays)]
    )
    metric("diffusionx_unet_calls_total", "counter", "batched U-Net calls", [("", load.unet_calls)])
    metric("diffusionx_queue_depth", "gauge", "requests waiting for a batch slot", [("", load.queue_depth)])
    metric("diffusionx_running_batch", "gauge", "jobs in the running batch", [("", load.running)])
    metric("diffusionx_max_batch", "gauge", "batch size limit", [("", load.max_batch)])
    metric("diffusionx_step_seconds", "gauge", "recent wall time of one U-Net step", [("", load.step_time_s)])
    metric(
        "diffusionx_estimated_wait_seconds",
        "gauge",
        "estimated wait before a new request's first step",
        [("", load.estimated_wait_s)],
    )
    metric("diffusionx_draining", "gauge", "1 while shutting down", [("", float(load.draining))])
    return out.getvalue()
