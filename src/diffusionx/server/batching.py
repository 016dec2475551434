"""Continuous step-level batching: one thread owns the engine and runs every request's denoising.

One worker thread does all of a request's torch work: it prepares it by the refine contract
(`CloudRefiner.prepare`: checks, the payload parsed once, the prompt encoded, the job started)
when a slot in the batch is free, steps it, and finishes it. Every iteration of the worker loop

1. admits accepted requests (FIFO) at the step boundary until `max_batch` jobs are active,
   preparing each as it is admitted (a request that cannot be prepared fails alone),
2. calls `engine.step` once per latent shape among the active jobs: one U-Net call advances every
   job of that shape by one step, each at its own timestep (requests at different strengths
   share the call; requests at different sizes cannot, so each size gets its own call),
3. finishes the jobs that just ended with `CloudRefiner.finish_each` (the checks of the result,
   PNGs decoded together, the payload encoded) and hands each result to its caller.

Why the preparation is not on a thread of its own: every thread that runs torch ops gets its own
OpenMP team, and once a process has more OpenMP threads than cores, libgomp stops spinning between
parallel regions (its "throttled" spin count) and every op pays a futex wake-up. Measured on 2
cores (docs/serving.md): with a second thread's team alive, the embedded cloud U-Net's step took
2x as long at batch 1 and 25-60% longer at batch 8; preparing costs ~1 ms a request.

So a short request that arrives while a long one is running joins it at the next step and leaves
as soon as it is done; nobody waits for a whole batch to finish. A request's result is the bytes
`CloudRefiner.refine` gives for it, up to the float rounding between batch sizes.

`BatchingRefiner` implements the `Refiner` protocol (`refine(request)` blocks) and `submit()`
(returns a `concurrent.futures.Future`) for the HTTP server.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any

from ..cloud import CloudRefiner, RefineJob, RefineRequest, RefineResult
from ..engine import Engine, steps_for_strength
from ..errors import InvalidInputError
from ..wire import NonFiniteResultError

log = logging.getLogger(__name__)


class ServiceUnavailableError(RuntimeError):
    """The refiner is shutting down or its queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Work:
    request: RefineRequest
    future: Future
    submitted: float
    seq: int
    job: RefineJob | None = None
    admitted: float = 0.0
    largest_batch: int = 0


@dataclass
class ServedResult(RefineResult):
    seq: int = 0  # this was the seq-th request the refiner completed
    largest_batch: int = 0  # the most jobs this request shared a U-Net call with (itself included)


@dataclass
class LoadReport:
    queue_depth: int  # accepted, not yet admitted into the running batch
    running: int  # jobs in the running batch
    max_batch: int
    step_time_s: float  # recent wall time of one U-Net step (moving average; 0 before the first)
    estimated_wait_s: float  # how long a request sent now would wait before its first step
    completed: int
    failed: int
    unet_calls: int  # batched U-Net calls so far
    draining: bool
    unet_seconds: float = 0.0  # wall time of those calls: with a clock, how busy the U-Net was

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BatchingRefiner:
    """Owns the engine (of `engine`, or of the CloudRefiner given) on one worker thread; see the
    module docstring."""

    def __init__(self, engine: Engine | CloudRefiner, *, max_batch: int = 8, max_queue: int = 256, name: str = "cloud"):
        if max_batch < 1:
            raise InvalidInputError(f"max_batch must be >= 1, got {max_batch}")
        self.refiner = engine if isinstance(engine, CloudRefiner) else CloudRefiner(engine)
        self.engine = self.refiner.engine
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self._incoming: collections.deque[_Work] = collections.deque()  # accepted, waiting for a slot
        self._active: list[_Work] = []
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()
        self._seq = itertools.count(1)
        self.completed = 0
        self.failed = 0
        self.unet_calls = 0
        self.unet_seconds = 0.0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._step_time = 0.0
        self.crashed: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"diffusionx-{name}-batcher", daemon=True)
        self._thread.start()

    # ----- public -----------------------------------------------------------------------------
    def submit(self, request: RefineRequest) -> Future:
        """Queue a request; the future resolves to a RefineResult or raises InvalidInputError."""
        request.validate()
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise ServiceUnavailableError("the refiner is shutting down; retry on another instance", 5.0)
            if len(self._incoming) >= self.max_queue:
                raise ServiceUnavailableError(
                    f"the queue is full ({self.max_queue} waiting); retry later",
                    max(1.0, self._estimate_wait_locked()),
                )
            self._incoming.append(_Work(request, future, time.perf_counter(), next(self._seq)))
            self._cond.notify_all()
        return future

    def refine(self, request: RefineRequest) -> RefineResult:
        return self.submit(request).result()

    def load(self) -> LoadReport:
        with self._cond:
            return LoadReport(
                queue_depth=len(self._incoming),
                running=len(self._active),
                max_batch=self.max_batch,
                step_time_s=self._step_time,
                estimated_wait_s=self._estimate_wait_locked(),
                completed=self.completed,
                failed=self.failed,
                unet_calls=self.unet_calls,
                draining=self._closing,
                unet_seconds=self.unet_seconds,
            )

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._incoming and not self._active

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting. With `drain`, finish every accepted request first; otherwise fail the
        waiting ones with ServiceUnavailableError. Returns True once the worker has stopped."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._incoming:
                    work = self._incoming.popleft()
                    if not work.future.done():
                        work.future.set_exception(ServiceUnavailableError("the refiner shut down before this ran"))
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def finish_estimate_s(self, futures: Iterable[Future]) -> float | None:
        """Seconds until the first of these accepted requests is done (the admission simulation of
        `estimated_wait_s`, followed to each job's last step); None when none of them is here or
        no step has been timed yet."""
        wanted = set(futures)
        with self._cond:
            step = self._step_time
            finishes = [job_remaining(w) for w in self._active if w.future in wanted]
            slots = [job_remaining(w) for w in self._active] + [0] * (self.max_batch - len(self._active))
            heapq.heapify(slots)
            for work in self._waiting_locked():
                done_at = heapq.heappop(slots) + _planned_steps(work.request)
                heapq.heappush(slots, done_at)
                if work.future in wanted:
                    finishes.append(done_at)
        if not finishes or not step:
            return None
        return float(min(finishes) * step)

    # ----- estimates --------------------------------------------------------------------------
    def _waiting_locked(self) -> list[_Work]:
        """Every accepted request not yet in the batch, in admission order."""
        return list(self._incoming)

    def _estimate_wait_locked(self) -> float:
        """Simulate admission: each slot frees when its job's remaining steps are done."""
        slots = [job_remaining(w) for w in self._active] + [0] * (self.max_batch - len(self._active))
        heapq.heapify(slots)
        for work in self._waiting_locked():
            free_at = heapq.heappop(slots)
            heapq.heappush(slots, free_at + _planned_steps(work.request))
        step = self._step_time or 0.0
        return float(slots[0] * step) if slots else 0.0

    # ----- the worker -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """False once the worker has stopped (closed, or crashed: then `crashed` says why)."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            self._guarded(self._run, "batching worker")
        finally:
            self._stopped.set()

    def _guarded(self, loop, what: str) -> None:
        try:
            loop()
        except BaseException as err:  # a bug in a loop: fail everything rather than hang callers
            log.exception("the %s crashed", what)
            self.crashed = err
            with self._cond:
                self._closing = True
                waiting = [*self._incoming, *self._active]
                self._incoming.clear()
                self._active.clear()
                self._cond.notify_all()
            for work in waiting:
                if not work.future.done():
                    work.future.set_exception(ServiceUnavailableError(f"the refiner's {what} crashed: {err!r}", 5.0))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._active and not self._closing:
                    self._cond.wait()
                if self._closing and not self._incoming and not self._active:
                    return
                admit = []
                while self._incoming and len(self._active) < self.max_batch:
                    work = self._incoming.popleft()
                    self._active.append(work)  # in the batch already, so the refiner never looks idle
                    admit.append(work)
            for work in admit:
                self._admit(work)
            self._step()

    def _admit(self, work: _Work) -> None:
        """Prepare an admitted request on this thread (see the module docstring); until then it is
        in the batch without a job, which `_step` skips."""
        if not work.future.set_running_or_notify_cancel():  # cancelled while it waited
            with self._cond:
                self._active.remove(work)
                self._cond.notify_all()
            return
        try:
            work.job = self.refiner.prepare(work.request)
        except Exception as err:
            self._fail(work, err)
            return
        work.admitted = time.perf_counter()
        if work.job.job.done:  # strength 0: nothing to denoise
            self._finish([work])

    def _step(self) -> None:
        with self._cond:
            active = [w for w in self._active if w.job is not None and not w.job.job.done]
        if active:
            by_shape: dict[tuple[int, ...], list[_Work]] = {}
            for work in active:  # one U-Net call per latent shape: a batch is one tensor
                by_shape.setdefault(tuple(work.job.job.latents.shape), []).append(work)
            start = time.perf_counter()
            for group in by_shape.values():
                try:
                    self.engine.step([w.job.job for w in group])
                except Exception as err:
                    log.exception("U-Net step failed for a batch of %d", len(group))
                    for work in group:
                        self._fail(work, err)
                    continue
                for work in group:
                    work.largest_batch = max(work.largest_batch, len(group))
                with self._cond:
                    self.unet_calls += 1
                    self.batch_sizes[len(group)] += 1
            elapsed = time.perf_counter() - start
            with self._cond:
                self.unet_seconds += elapsed
                self._step_time = elapsed if not self._step_time else 0.8 * self._step_time + 0.2 * elapsed
        self._finish([work for work in active if work.job.job.done and not work.future.done()])

    def _finish(self, works: list[_Work]) -> None:
        """The refine contract's `finish` for the jobs that just ended: each its result or failure."""
        if not works:
            return
        for work, outcome in zip(works, self.refiner.finish_each([work.job for work in works])):
            if isinstance(outcome, Exception):
                if isinstance(outcome, NonFiniteResultError):
                    log.warning("refinement seq %d: %s", work.seq, outcome)
                self._fail(work, outcome)
                continue
            result = ServedResult(
                **{f.name: getattr(outcome, f.name) for f in fields(RefineResult)},
                largest_batch=work.largest_batch,
            )
            result.queue_s = work.admitted - work.submitted
            with self._cond:
                self._active.remove(work)
                self.completed += 1
                result.seq = self.completed
                self._cond.notify_all()
            work.future.set_result(result)

    def _fail(self, work: _Work, err: Exception) -> None:
        with self._cond:
            if work in self._active:
                self._active.remove(work)
            self.failed += 1
            self._cond.notify_all()
        if not work.future.done():
            work.future.set_exception(err)


def _planned_steps(request: RefineRequest) -> int:
    try:
        return steps_for_strength(request.strength, request.steps)
    except InvalidInputError:
        return 0


def job_remaining(work: _Work) -> int:
    if work.job is None:
        return _planned_steps(work.request)
    return work.job.job.num_steps - work.job.job.step_index
