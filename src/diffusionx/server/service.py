"""The refinement service behind the HTTP app: one `Service` per app holds the refiner (a
continuous batcher, or any blocking refiner run one at a time), the request's conversion and
checks (the refine contract's own, `cloud.check_request`), idempotency through the store
(claims, leases, replays), the drain, the admission that keeps the p95 target, and what /v1/load
and /metrics report (metrics.py: the Prometheus registry of this service).

Nothing here speaks HTTP beyond raising `ApiError`; routes.py is the FastAPI wiring around it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..cloud import CloudRefiner, RefineRequest, RefineResult, check_request, result_problem
from ..engine import Engine, steps_for_strength
from ..errors import InvalidInputError
from ..wire import NonFiniteResultError, PayloadError
from .batching import BatchingRefiner, LoadReport, ServiceUnavailableError
from .config import Limits
from .guards import ApiError, Authenticator, Quota, admission_refusal, draining_error, retry_after
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .schemas import RefineBody, RefineResponse
from .store import Entry, IdempotencyStore, MemoryStore, open_store, request_fingerprint

log = logging.getLogger(__name__)
KNOWN_PATHS = frozenset({"/v1/refine", "/v1/health", "/v1/load", "/metrics", "/openapi.json", "/docs"})


def as_refiner(refiner_or_engine: Any, *, max_batch: int, max_queue: int) -> Any:
    """What the service runs: an Engine gets a continuous batcher of `max_batch`; a refiner with
    submit/load (a BatchingRefiner) is used as it is; any blocking Refiner is run one at a time."""
    if isinstance(refiner_or_engine, Engine):
        return BatchingRefiner(refiner_or_engine, max_batch=max_batch, max_queue=max_queue)
    if hasattr(refiner_or_engine, "submit") and hasattr(refiner_or_engine, "load"):
        return refiner_or_engine
    if hasattr(refiner_or_engine, "refine"):
        return _SerialRefiner(refiner_or_engine)
    raise InvalidInputError(f"create_app needs an Engine or a Refiner, got {type(refiner_or_engine).__name__}")


def service_store(store: IdempotencyStore | str | os.PathLike | None, limits: Limits) -> tuple[IdempotencyStore, bool]:
    """(the idempotency store, whether the service owns it and closes it): the caller's
    `IdempotencyStore`, or one opened from what `open_store` takes; in memory by default."""
    if store is None:
        return MemoryStore(**store_settings(limits)), True
    if hasattr(store, "claim"):
        return store, False  # type: ignore[return-value]
    return open_store(store, **store_settings(limits)), True


def default_replica() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Local:
    """A keyed request this process is settling: the first handler for (token, key) settles it
    (from the store, or by computing), concurrent ones with the same key wait on `outcome`: a
    Future of (response body, replayed from the store)."""

    fingerprint: str
    outcome: Future
    owned: bool = False  # holds the store's pending claim: its lease is renewed until it is settled


class _SerialRefiner:
    """Adapts any blocking `Refiner` (e.g. CloudRefiner) to submit/load: one request at a time.

    Its load report: `running` 1 while a refinement runs, `step_time_s` a moving average of one
    U-Net step (the results' `Timing.unet_s / unet_calls`), `estimated_wait_s` until a request sent
    now would start: the refinements in line times the mean refinement, less the running one's
    elapsed time (at least a tenth of a mean refinement once it has run past the mean)."""

    def __init__(self, refiner: Any):
        self.refiner = refiner
        self.engine = getattr(refiner, "engine", None)
        self.max_batch = 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="diffusionx-refiner")
        self._waiting = 0
        self._lock = threading.Lock()
        self.completed = self.failed = self.unet_calls = 0
        self.unet_seconds = 0.0
        self._closing = False
        self._order: list[Future] = []  # submitted and not yet done, first come first served
        self._running_since = 0.0
        self._mean_s = 0.0  # moving average of one refinement's wall time
        self._step_s = 0.0  # moving average of one U-Net step's wall time

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
            self._note_steps(result)
            self.completed += 1
            self.unet_calls += result.unet_steps
            result.seq = self.completed  # type: ignore[attr-defined]
            return result

        future = self._pool.submit(run)
        with self._lock:
            self._order.append(future)
        future.add_done_callback(self._forget)
        return future

    def _note_steps(self, result: RefineResult) -> None:
        timing = getattr(result, "timing", None)
        calls = getattr(timing, "unet_calls", 0) or 0
        if not calls or not timing.unet_s > 0:
            return
        step = timing.unet_s / calls
        with self._lock:
            self.unet_seconds += timing.unet_s
            self._step_s = step if not self._step_s else 0.8 * self._step_s + 0.2 * step

    def _forget(self, future: Future) -> None:
        with self._lock:
            if future in self._order:
                self._order.remove(future)

    def _running_locked(self) -> bool:
        return bool(self._order) and self._order[0].running()

    def _estimate_wait_locked(self) -> float:
        if not self._mean_s or not self._order:
            return 0.0
        ahead = len(self._order)
        if not self._running_locked():
            return ahead * self._mean_s
        left = max(self._mean_s - (time.perf_counter() - self._running_since), 0.1 * self._mean_s)
        return (ahead - 1) * self._mean_s + left

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
        with self._lock:
            return LoadReport(
                queue_depth=self._waiting,
                running=int(self._running_locked()),
                max_batch=1,
                step_time_s=self._step_s,
                estimated_wait_s=self._estimate_wait_locked(),
                completed=self.completed,
                failed=self.failed,
                unet_calls=self.unet_calls,
                draining=self._closing,
                unet_seconds=self.unet_seconds,
            )

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
        self.auth = Authenticator(tokens)
        self.tokens = self.auth.tokens
        self.insecure = insecure
        self.limits = limits
        self.replica = replica
        self.quota = Quota(limits)
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
        # /metrics: this service's own registry (metrics.py)
        self.metrics = ServiceMetrics(
            self.load, max_batch=getattr(refiner, "max_batch", 1) or 1, target_p95_s=limits.target_p95_s
        )
        self.metrics.recent.note_calls(self.load().unet_calls)
        self.replays = 0  # retries answered from the store or by joining a computation
        self._lock = threading.Lock()

    def authenticate(self, header: str | None) -> str:
        """The caller's identity for quotas and idempotency (401/403 unless the token is accepted)."""
        return self.auth.identify(header)

    def check_draining(self) -> None:
        if self.draining:
            raise draining_error()

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
        """One HTTP request answered: its path (or "other"), status and end-to-end seconds."""
        self.metrics.observe_request(path if path in KNOWN_PATHS else "other", status, seconds)

    def observe_disconnect(self, path: str) -> None:
        """A client hung up before its request was read: its fault, not a server error."""
        self.metrics.disconnects.labels(path if path in KNOWN_PATHS else "other").inc()

    def metrics_text(self) -> tuple[bytes, str]:
        """The /metrics body (Prometheus text exposition) and its Content-Type."""
        return self.metrics.text(), CONTENT_TYPE_LATEST

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
    def admit(self, request: RefineRequest) -> None:
        """The p95 target's admission (`guards.admission_refusal` has the rule): 429 `overloaded`
        when the refiner's estimated wait for a slot plus this request's own expected time (its
        U-Net steps x the refiner's recent step time, plus the recent refinements' mean time in
        the refiner beyond their U-Net calls) is over `Limits.target_p95_s`. Off when that is None.
        Only new computations come here: a retry that joins or replays its key never does."""
        load = self.refiner.load()
        self.metrics.recent.note_calls(load.unet_calls)
        target = self.limits.target_p95_s
        if target is None:
            return
        window = self.metrics.recent.window(load.unet_calls)
        try:
            steps = steps_for_strength(request.strength, request.steps)
        except InvalidInputError:
            steps = 0
        own = steps * window.step_s(load.step_time_s) + window.overhead_s
        refusal = admission_refusal(target, load.estimated_wait_s, own)
        if refusal is not None:
            self.metrics.refusals.inc()
            raise refusal

    def compute(self, who: str, request: RefineRequest, request_id: str) -> Future:
        """Admission (the p95 target), quota, then the refiner: a Future of the response body (an
        ApiError if it failed)."""
        self.admit(request)
        self.quota.acquire(who, lambda: self.until_one_finishes(who))
        submitted = time.perf_counter()
        try:
            future = self.refiner.submit(request)
        except ServiceUnavailableError as err:
            self.quota.release(who)
            raise ApiError(503, "unavailable", str(err), retry_after(err.retry_after)) from None
        except InvalidInputError as err:
            self.quota.release(who)
            raise ApiError(422, "invalid_input", str(err)) from None
        future.add_done_callback(lambda _: self.quota.release(who))
        self.track(who, future)
        outcome: Future = Future()

        def done(f: Future) -> None:
            elapsed = time.perf_counter() - submitted
            try:
                self._results.submit(self._finish, f, request_id, outcome, elapsed)
            except RuntimeError:  # shut down (a drain that timed out): finish here
                self._finish(f, request_id, outcome, elapsed)

        future.add_done_callback(done)
        return outcome

    def _finish(self, future: Future, request_id: str, outcome: Future, elapsed_s: float = 0.0) -> None:
        """The refiner's outcome as the response body (or its ApiError) on `outcome`; a computed
        result is in the metrics (`elapsed_s`: from its submission to its result) before that."""
        try:
            result = future.result()
            # A refiner outside the refine contract (whose finish checks every result): never
            # answer its NaN as a success.
            problem = None if self._contract else result_problem(result)
            if problem is not None:
                raise _non_finite(request_id, f"the refinement produced {problem}")
            body = RefineResponse.from_result(result, request_id, self.replica).model_dump()
            self._observe_result(result, elapsed_s)
            outcome.set_result(body)
        except ApiError as err:
            outcome.set_exception(err)
        except InvalidInputError as err:
            outcome.set_exception(ApiError(422, "invalid_input", str(err)))
        except ServiceUnavailableError as err:
            outcome.set_exception(ApiError(503, "unavailable", str(err), retry_after(err.retry_after)))
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

    def _observe_result(self, result: RefineResult, elapsed_s: float) -> None:
        try:
            calls = self.refiner.load().unet_calls
            self.metrics.observe_result(result, max(0.0, elapsed_s - result.queue_s), calls)
        except Exception:  # metrics never cost an answer
            log.exception("could not record the metrics of a refinement")

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

    def begin_async(self, who: str, key: str, request: RefineRequest) -> asyncio.Future:
        """`begin` in a claims thread, off the event loop (the store is blocking I/O)."""
        return asyncio.get_running_loop().run_in_executor(self._claims, self.begin, who, key, request)

    def count_replay(self) -> None:
        with self._lock:
            self.replays += 1  # also read by tests; /metrics has the counter
        self.metrics.replays.inc()

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
                    retry_after(5),
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
                    retry_after(min(5.0, max(1.0, claim.entry.expires - time.time()))),
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


def store_settings(limits: Limits) -> dict[str, Any]:
    return {
        "capacity_per_token": limits.idempotency_keys_per_token,
        "window_s": limits.idempotency_window_s,
        "lease_s": limits.idempotency_lease_s,
    }
