"""The service's Prometheus metrics (`prometheus_client`), one `CollectorRegistry` per `Service`
(never the global one: a process may hold many apps, tests build dozens), and the window of
recent work behind the throughput gauges and the admission estimate (`RecentWork`).

What the server observes as it happens is a prometheus_client instrument (the request counters,
the histograms); what the refiner keeps (completed, failed, U-Net calls, queue depth, step time,
...) is read from its `LoadReport` at scrape time by `_RefinerCollector`, so it is never stale and
never counted twice.

The share of the throughput bound (`diffusionx_throughput_bound_share`): server/capacity.py's
bound is b / (k t(b)) refinements/s at batch b, k U-Net steps per refinement and t(b) seconds per
step. Over the last `WINDOW_S` seconds (less while the server is younger):

- achieved = refinements completed in the window / the window's length;
- b = the window's request-steps per U-Net call (its completed refinements' U-Net steps / the
  refiner's U-Net calls in it; the load test's "mean batch"), clamped to 1..max_batch;
- k = those U-Net steps / those refinements;
- t = the refiner's recent step time (`LoadReport.step_time_s`; for a refiner that reports none,
  the window's results' U-Net wall time per call);
- share = achieved / (b / (k t)), which comes to (U-Net calls in the window x t) / the window: the
  fraction of the last minute the U-Net was busy at the step time it runs at now.

So it answers "how close to what the hardware allows *at the batch size this load reached*", as
the load test's share of the bound does (benchmarks/loadtest.py): near 1 the server does little
but U-Net calls; the rest went to text encoding, VAE, payloads, batch formation, or to having no
work. It is only meaningful under load (an idle server is at 0 by definition), and a low
`diffusionx_recent_mean_batch` under heavy load says the batches do not fill, which this share does
not see (the bound at max_batch is higher). NaN while there is nothing to judge it by (no step
timed, no U-Net step in the window).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as err:  # pragma: no cover - the serve extra has it
    raise ImportError(
        "the refinement server's /metrics needs prometheus_client: pip install 'diffusionx[serve]'"
    ) from err

from .batching import LoadReport

WINDOW_S = 60.0  # the throughput gauges' and the admission overhead's window
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)

__all__ = ["CONTENT_TYPE_LATEST", "WINDOW_S", "RecentWork", "ServiceMetrics", "Window", "batch_buckets"]


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Every size up to 8, then powers of two, and max_batch itself: a histogram of whole numbers."""
    sizes = set(range(1, min(max_batch, 8) + 1)) | {2**i for i in range(3, 12) if 2**i <= max_batch} | {max_batch}
    return (*sorted(float(s) for s in sizes), math.inf)


# ----- the window of recent work ----------------------------------------------------------------
@dataclass(frozen=True)
class _Sample:
    """Running totals at one moment: what completed up to then, and the refiner's U-Net calls."""

    t: float
    done: int = 0  # refinements computed (not replays)
    steps: int = 0  # their U-Net steps
    unet_s: float = 0.0  # their U-Net wall time (Timing.unet_s)
    job_calls: int = 0  # the U-Net calls they took part in (Timing.unet_calls)
    other_s: float = 0.0  # their time in the refiner beyond the U-Net calls (text, VAE, payload, the loop)
    calls: int = 0  # the refiner's U-Net calls (LoadReport.unet_calls)


@dataclass(frozen=True)
class Window:
    """What happened in the window: differences of running totals over `seconds`."""

    seconds: float
    done: int
    steps: int
    unet_s: float
    job_calls: int
    other_s: float
    calls: int

    @property
    def overhead_s(self) -> float:
        """Mean time a refinement spent in the refiner beyond its U-Net calls (0 with none)."""
        return self.other_s / self.done if self.done else 0.0

    def step_s(self, reported: float) -> float:
        """The step time: the refiner's, else the window's results' U-Net wall time per call."""
        if reported > 0:
            return reported
        return self.unet_s / self.job_calls if self.job_calls else 0.0

    def throughput(self, step_s: float, max_batch: int) -> dict[str, float]:
        """achieved/s, the bound b / (k t) at the window's batch and step mix, the share, b, k."""
        nan = math.nan
        achieved = self.done / self.seconds if self.seconds > 0 else 0.0
        if not self.done:
            return {"per_s": achieved, "bound_per_s": nan, "share": 0.0, "mean_batch": nan, "k": nan}
        k = self.steps / self.done
        if not self.steps or not self.calls or not step_s > 0:
            return {"per_s": achieved, "bound_per_s": nan, "share": nan, "mean_batch": nan, "k": k}
        batch = min(max(self.steps / self.calls, 1.0), float(max(1, max_batch)))
        bound = batch / (k * step_s)
        return {"per_s": achieved, "bound_per_s": bound, "share": achieved / bound, "mean_batch": batch, "k": k}


class RecentWork:
    """Running totals sampled at every submission, completion and scrape, kept for `window_s`
    (plus the newest sample before it: the window's baseline). Thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, calls: int = 0, clock: Callable[[], float] = time.monotonic):
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: collections.deque[_Sample] = collections.deque([_Sample(clock(), calls=calls)])

    def _push(self, sample: _Sample) -> None:
        self._samples.append(sample)
        self._prune(sample.t)

    def _prune(self, now: float) -> None:
        """Drop what is older than the window, keeping the newest sample at or before its edge."""
        edge = now - self.window_s
        while len(self._samples) >= 2 and self._samples[1].t <= edge:
            self._samples.popleft()

    def note_calls(self, calls: int) -> None:
        """The refiner's U-Net call count now (at a submission, a scrape)."""
        with self._lock:
            last = self._samples[-1]
            self._push(_Sample(self._clock(), last.done, last.steps, last.unet_s, last.job_calls, last.other_s, calls))

    def note_result(self, result: Any, in_refiner_s: float, calls: int) -> None:
        """One computed refinement: its U-Net steps and timings; `in_refiner_s` from its admission
        to its result (submission to result, less its queue wait)."""
        timing = result.timing
        other = max(0.0, in_refiner_s - timing.unet_s)
        with self._lock:
            last = self._samples[-1]
            self._push(
                _Sample(
                    self._clock(),
                    last.done + 1,
                    last.steps + int(result.unet_steps),
                    last.unet_s + timing.unet_s,
                    last.job_calls + int(timing.unet_calls),
                    last.other_s + other,
                    max(calls, last.calls),
                )
            )

    def window(self, calls: int | None = None) -> Window:
        """The last `window_s` (the server's life, while shorter); `calls`: the refiner's now."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            first, last = self._samples[0], self._samples[-1]
        start = max(now - self.window_s, first.t)
        calls_now = last.calls if calls is None else max(calls, last.calls)
        return Window(
            seconds=max(0.0, now - start),
            done=last.done - first.done,
            steps=last.steps - first.steps,
            unet_s=last.unet_s - first.unet_s,
            job_calls=last.job_calls - first.job_calls,
            other_s=last.other_s - first.other_s,
            calls=max(0, calls_now - first.calls),
        )


# ----- the registry -----------------------------------------------------------------------------
class ServiceMetrics:
    """The instruments of one service, in their own registry; `text()` is the /metrics body."""

    def __init__(
        self,
        load: Callable[[], LoadReport],
        *,
        max_batch: int,
        target_p95_s: float | None = None,
        recent: RecentWork | None = None,
    ):
        self.registry = CollectorRegistry()
        self.recent = recent or RecentWork()
        r = self.registry
        self.requests = Counter(
            "diffusionx_http_requests_total", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.disconnects = Counter(
            "diffusionx_client_disconnects_total",
            "requests whose client hung up before the body was read (not counted as HTTP requests)",
            ["path"],
            registry=r,
        )
        self.disconnects.labels("/v1/refine")
        self.refine_seconds = Histogram(
            "diffusionx_refine_seconds",
            "end-to-end latency of successful refinements (/v1/refine answered 200, replays included), "
            "from the request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "diffusionx_queue_wait_seconds",
            "computed refinements' wait for a batch slot before their first step (RefineResult.queue_s)",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "diffusionx_compute_seconds",
            "computed refinements' own compute: text encoding, VAE, U-Net calls, decode (timings total_s)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "diffusionx_batch_size",
            "the most requests a computed refinement shared a U-Net call with, itself included "
            "(ServedResult.largest_batch; 1 when served one at a time; none for 0-step refinements)",
            buckets=batch_buckets(max_batch),
            registry=r,
        )
        self.replays = Counter(
            "diffusionx_idempotent_replays_total", "retries answered from the idempotency store", registry=r
        )
        self.refusals = Counter(
            "diffusionx_admission_refusals_total",
            "refinements refused with 429 'overloaded': predicted end to end over the p95 target",
            registry=r,
        )
        r.register(_RefinerCollector(load, self.recent, max_batch, target_p95_s))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        if path == "/v1/refine" and status == 200:
            self.refine_seconds.observe(seconds)

    def observe_result(self, result: Any, in_refiner_s: float, calls: int) -> None:
        """A refinement the refiner computed (not a replay)."""
        self.queue_seconds.observe(max(0.0, float(result.queue_s)))
        self.compute_seconds.observe(max(0.0, float(result.timing.total_s)))
        batch = getattr(result, "largest_batch", None)
        if batch is None and result.unet_steps > 0:
            batch = 1  # a refiner without batching (the one-at-a-time adapter)
        if batch:
            self.batch_size.observe(batch)
        self.recent.note_result(result, in_refiner_s, calls)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _RefinerCollector(Collector):
    """What the refiner reports, read at scrape time, and the throughput gauges of its window."""

    def __init__(self, load: Callable[[], LoadReport], recent: RecentWork, max_batch: int, target: float | None):
        self._load, self._recent, self._max_batch, self._target = load, recent, max_batch, target

    def describe(self) -> list:
        return []  # nothing to check against other collectors; collect() asks the refiner

    def collect(self) -> Iterator[Any]:
        load = self._load()
        self._recent.note_calls(load.unet_calls)
        window = self._recent.window(load.unet_calls)
        step_s = window.step_s(load.step_time_s)
        through = window.throughput(step_s, load.max_batch or self._max_batch)

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, text, value=value)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        yield counter("diffusionx_refinements_completed_total", "refinements finished", load.completed)
        yield counter("diffusionx_refinements_failed_total", "refinements that failed", load.failed)
        yield counter("diffusionx_unet_calls_total", "batched U-Net calls", load.unet_calls)
        yield counter("diffusionx_unet_seconds_total", "wall time of the U-Net calls", load.unet_seconds)
        yield gauge("diffusionx_queue_depth", "requests waiting for a batch slot", load.queue_depth)
        yield gauge("diffusionx_running_batch", "jobs in the running batch", load.running)
        yield gauge("diffusionx_max_batch", "batch size limit", load.max_batch)
        yield gauge("diffusionx_step_seconds", "recent wall time of one U-Net step", load.step_time_s)
        yield gauge(
            "diffusionx_estimated_wait_seconds",
            "estimated wait before a new request's first step",
            load.estimated_wait_s,
        )
        yield gauge("diffusionx_draining", "1 while shutting down", float(load.draining))
        yield gauge(
            "diffusionx_throughput_per_second",
            f"refinements computed per second over the last {WINDOW_S:g} s",
            through["per_s"],
        )
        yield gauge(
            "diffusionx_throughput_bound_per_second",
            "the hardware's bound b / (k t) at the window's mean batch b, U-Net steps per refinement k and "
            "the recent step time t (NaN until known)",
            through["bound_per_s"],
        )
        yield gauge(
            "diffusionx_throughput_bound_share",
            "throughput / its bound over the window = the fraction of it the U-Net was busy (0 when idle; "
            "see docs/serving.md)",
            through["share"],
        )
        yield gauge(
            "diffusionx_recent_mean_batch",
            "request-steps per U-Net call over the window (the b of the bound)",
            through["mean_batch"],
        )
        yield gauge(
            "diffusionx_recent_unet_steps_per_refinement",
            "U-Net steps per computed refinement over the window (the k of the bound)",
            through["k"],
        )
        if self._target is not None:
            yield gauge(
                "diffusionx_target_p95_seconds",
                "the admission target: refinements predicted to take longer end to end are refused (429)",
                self._target,
            )
