"""Continuous step-level batching: one thread owns the engine and runs every request's denoising.

Each request becomes a `DenoiseJob`. Every iteration of the worker loop

1. admits waiting requests (FIFO) at the step boundary until `max_batch` jobs are active,
2. calls `engine.step(active)` once: one U-Net call advances every active job by one step, each at
   its own timestep (requests at different strengths share the call),
3. completes the jobs that just finished (serialize or decode, hand the result to the caller).

So a short request that arrives while a long one is running joins it at the next step and leaves
as soon as it is done; nobody waits for a whole batch to finish. For the same seed a request's
result is its unbatched result (only float rounding differs between batch sizes).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from ..cloud import RefineRequest, RefineResult, _read_png
from ..engine import DenoiseJob, Engine, Timing, steps_for_strength
from ..errors import InvalidInputError
from ..wire import (
    LATENT_KEY,
    NonFiniteResultError,
    check_latent_values,
    image_to_png,
    latent_value_problem,
    latents_from_bytes,
    latents_to_bytes,
)

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
    job: DenoiseJob | None = None
    timing: Timing = field(default_factory=Timing)
    admitted: float = 0.0
    unet_steps: int = 0
    largest_batch: int = 0
    wire_dtype: str = "fp16"


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BatchingRefiner:
    """Owns `engine` on one worker thread; see the module docstring."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 256, name: str = "cloud"):
        if max_batch < 1:
            raise InvalidInputError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self._pending: collections.deque[_Work] = collections.deque()
        self._active: list[_Work] = []
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()
        self._seq = itertools.count(1)
        self.completed = 0
        self.failed = 0
        self.unet_calls = 0
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
            if len(self._pending) >= self.max_queue:
                raise ServiceUnavailableError(
                    f"the queue is full ({self.max_queue} waiting); retry later",
                    max(1.0, self._estimate_wait_locked()),
                )
            self._pending.append(_Work(request, future, time.perf_counter(), next(self._seq)))
            self._cond.notify_all()
        return future

    def refine(self, request: RefineRequest) -> RefineResult:
        return self.submit(request).result()

    def load(self) -> LoadReport:
        with self._cond:
            return LoadReport(
                queue_depth=len(self._pending),
                running=len(self._active),
                max_batch=self.max_batch,
                step_time_s=self._step_time,
                estimated_wait_s=self._estimate_wait_locked(),
                completed=self.completed,
                failed=self.failed,
                unet_calls=self.unet_calls,
                draining=self._closing,
            )

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._active

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting. With `drain`, finish every accepted request first; otherwise fail the
        waiting ones with ServiceUnavailableError. Returns True once the worker has stopped."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._pending:
                    work = self._pending.popleft()
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
            for work in self._pending:
                done_at = heapq.heappop(slots) + _planned_steps(work.request)
                heapq.heappush(slots, done_at)
                if work.future in wanted:
                    finishes.append(done_at)
        if not finishes or not step:
            return None
        return float(min(finishes) * step)

    # ----- estimates --------------------------------------------------------------------------
    def _estimate_wait_locked(self) -> float:
        """Simulate admission: each slot frees when its job's remaining steps are done."""
        slots = [job_remaining(w) for w in self._active] + [0] * (self.max_batch - len(self._active))
        heapq.heapify(slots)
        for work in self._pending:
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
            self._run()
        except BaseException as err:  # a bug in the loop: fail everything rather than hang callers
            log.exception("the batching worker crashed")
            self.crashed = err
            with self._cond:
                self._closing = True
                waiting = list(self._pending) + list(self._active)
                self._pending.clear()
                self._active.clear()
            for work in waiting:
                if not work.future.done():
                    work.future.set_exception(ServiceUnavailableError(f"the refiner's worker crashed: {err!r}", 5.0))
        finally:
            self._stopped.set()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending and not self._active:
                    return
                admit = []
                while self._pending and len(self._active) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
            for work in admit:
                self._admit(work)
            self._step()

    def _admit(self, work: _Work) -> None:
        if not work.future.set_running_or_notify_cancel():
            return
        work.admitted = time.perf_counter()
        try:
            work.job = self._start(work)
        except Exception as err:
            self._fail(work, err)
            return
        with self._cond:
            self._active.append(work)
        if work.job.done and self._output_ok(work):  # strength 0: nothing to denoise
            self._finish(work)

    def _start(self, work: _Work) -> DenoiseJob:
        request, engine, timing = work.request, self.engine, work.timing
        if request.latents is not None:
            # The model's own size only: every job in a batch must have the same latent shape.
            latents = engine.check_latents(check_latent_values(latents_from_bytes(request.latents), "the latents"))
            work.wire_dtype = _wire_dtype(request.latents)
        else:
            start = time.perf_counter()
            image = _read_png(request.image_png)
            if (image.height, image.width) != (engine.default_size, engine.default_size):
                raise InvalidInputError(
                    f"image is {image.width}x{image.height} pixels; model {engine.name} takes "
                    f"{engine.default_size}x{engine.default_size}"
                )
            latents = engine.encode_image(image)
            timing.vae_encode_s = time.perf_counter() - start
        start = time.perf_counter()
        embeddings = engine.encode_prompt(request.prompt, guidance=request.guidance_scale > 1.0)
        timing.text_encode_s = time.perf_counter() - start
        job = engine.start(
            embeddings,
            seed=request.seed,
            steps=request.steps,
            strength=request.strength,
            init_latents=latents,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
        )
        job.timing = timing
        work.unet_steps = job.num_steps
        return job

    def _step(self) -> None:
        with self._cond:
            active = [w for w in self._active if w.job is not None and not w.job.done]
        if active:
            start = time.perf_counter()
            try:
                self.engine.step([w.job for w in active])
            except Exception as err:
                log.exception("U-Net step failed for a batch of %d", len(active))
                for work in active:
                    self._fail(work, err)
                return
            elapsed = time.perf_counter() - start
            for work in active:
                work.largest_batch = max(work.largest_batch, len(active))
            with self._cond:
                self.unet_calls += 1
                self.batch_sizes[len(active)] += 1
                self._step_time = elapsed if not self._step_time else 0.8 * self._step_time + 0.2 * elapsed
        done = [work for work in active if work.job.done and self._output_ok(work)]
        images = self._decode([work for work in done if work.request.return_format == "png"])
        for work in done:
            self._finish(work, images.get(id(work)))

    def _decode(self, works: list[_Work]) -> dict[int, Any]:
        """VAE-decode the PNG requests that finished on the same step in one call."""
        if not works:
            return {}
        start = time.perf_counter()
        try:
            images = self.engine.decode(torch.cat([work.job.latents for work in works]))
        except Exception as err:
            for work in works:
                self._fail(work, err)
            return {}
        elapsed = time.perf_counter() - start
        for work in works:
            work.timing.decode_s = elapsed
        return {id(work): image for work, image in zip(works, images)}

    def _finish(self, work: _Work, image: Any = None) -> None:
        job, request, timing = work.job, work.request, work.timing
        if work.future.done():  # failed while decoding
            return
        try:
            if request.return_format == "png":
                if image is None:
                    start = time.perf_counter()
                    image = self.engine.decode(job.latents)[0]
                    timing.decode_s = time.perf_counter() - start
                payload = image_to_png(image)
            else:
                payload = latents_to_bytes(job.latents, work.wire_dtype)
        except Exception as err:
            self._fail(work, err)
            return
        result = ServedResult(
            payload=payload,
            return_format=request.return_format,
            strength=request.strength,
            steps=request.steps,
            unet_steps=work.unet_steps,
            timing=timing,
            queue_s=work.admitted - work.submitted,
            largest_batch=work.largest_batch,
        )
        with self._cond:
            self._active.remove(work)
            self.completed += 1
            result.seq = self.completed
            self._cond.notify_all()
        work.future.set_result(result)

    def _output_ok(self, work: _Work) -> bool:
        """Non-finite or absurd latents are never a result (nor decoded into one): the request fails."""
        problem = latent_value_problem(work.job.latents)
        if problem is None:
            return True
        log.warning("refinement seq %d produced unusable latents: %s", work.seq, problem)
        self._fail(work, NonFiniteResultError(f"the refinement produced unusable latents: {problem}"))
        return False

    def _fail(self, work: _Work, err: Exception) -> None:
        with self._cond:
            if work in self._active:
                self._active.remove(work)
            self.failed += 1
            self._cond.notify_all()
        if not work.future.done():
            work.future.set_exception(err)


def _wire_dtype(data: bytes) -> str:
    """Answer in the precision the client sent: fp32 in, fp32 out; fp16 otherwise."""
    return "fp32" if load_safetensors(data)[LATENT_KEY].dtype == torch.float32 else "fp16"


def _planned_steps(request: RefineRequest) -> int:
    try:
        return steps_for_strength(request.strength, request.steps)
    except InvalidInputError:
        return 0


def job_remaining(work: _Work) -> int:
    if work.job is None:
        return _planned_steps(work.request)
    return work.job.num_steps - work.job.step_index
