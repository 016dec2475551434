"""Cost of a controlled round vs a plain one: seconds per step and peak memory.

    python benchmarks/control_cost.py --model untrained --steps 20 --out outputs/control_cost
    python benchmarks/control_cost.py --model sd15 --size 512 --steps 2 --out outputs/control_cost

Each mode runs in its own subprocess (so one mode's peak cannot hide another's); the peak is
the process's resident memory sampled every 5 ms during the round, minus the resident memory
just before it (models loaded, prompts encoded). Modes:

- ``plain``: `Engine.generate` (the default SDPA processors);
- ``recompute``: a controlled round that replays the previous round beside the edit;
- ``record``: a plain round that keeps its attention trace for the next round (cache mode);
- ``cached``: a controlled round that injects from that trace (no replay);
The trace's size is reported as ``trace_bytes``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

MODES = ("plain", "recompute", "record", "cached")
SOURCE = "a large red circle on the left and a small blue star at the top right on a white background"
TARGET = "a large green circle on the left and a small blue star at the top right on a white background"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _engine(model: str):
    from ..engine import Engine
    from ..models import build_random_sd_side, load_pair

    if model == "sd15":
        return Engine(**build_random_sd_side("random-sd15"), name="random-sd15")
    if model == "tiny-sd":
        return Engine(**build_random_sd_side("random-tiny-sd"), name="random-tiny-sd")
    return load_pair(model).edge


def run_mode(model: str, mode: str, size: int | None, steps: int) -> dict:
    import torch

    from . import ControlConfig, RoundSpec, controlled_generate

    torch.set_num_threads(1)
    engine = _engine(model)
    config = ControlConfig()
    kw = {"steps": steps, "height": size, "width": size}
    engine.encode_prompt(SOURCE)
    engine.encode_prompt(TARGET)
    spec = RoundSpec(SOURCE, seed=0)
    trace = None
    if mode == "cached":
        first = controlled_generate(engine, SOURCE, None, seed=0, keep_trace=True, decode=False, config=config, **kw)
        trace = first.trace
    torch.manual_seed(0)
    with torch.no_grad(), PeakRSS() as mem:
        start = time.perf_counter()
        if mode == "plain":
            out = engine.generate(TARGET, seed=0, decode=False, **kw)
            calls, trace_bytes = out.timing.unet_calls, 0
        elif mode == "record":
            out = controlled_generate(engine, SOURCE, None, seed=0, keep_trace=True, decode=False, config=config, **kw)
            calls, trace_bytes = out.timing.unet_calls, out.stats["trace_bytes"]
        else:
            out = controlled_generate(engine, TARGET, spec, trace=trace, decode=False, config=config, **kw)
            calls, trace_bytes = out.timing.unet_calls, (trace.nbytes() if trace else 0)
        seconds = time.perf_counter() - start
    return {
        "model": model,
        "mode": mode,
        "size": size or engine.default_size,
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "unet_calls": calls,
        "peak_extra_mb": mem.delta_mb,
        "rss_before_mb": mem.base / 2**20,
        "trace_bytes": trace_bytes,
    }


def interleaved(model: str, modes: list[str], size: int | None, steps: int, repeat: int) -> list[dict]:
    """Seconds per step of each mode, run in turn in one process `repeat` times (the machine's
    other load hits every mode alike); the minimum over the repeats."""
    import torch

    from . import ControlConfig, RoundSpec, controlled_generate

    torch.set_num_threads(1)
    engine = _engine(model)
    kw = {"steps": steps, "height": size, "width": size, "decode": False, "config": ControlConfig()}
    spec = RoundSpec(SOURCE, seed=0)
    times: dict[str, list[float]] = {m: [] for m in modes}
    trace = controlled_generate(engine, SOURCE, None, seed=0, keep_trace=True, **kw).trace
    for r in range(repeat):
        for mode in modes:
            start = time.perf_counter()
            if mode == "plain":
                engine.generate(TARGET, seed=0, steps=steps, height=size, width=size, decode=False)
            elif mode == "record":
                controlled_generate(engine, SOURCE, None, seed=0, keep_trace=True, **kw)
            else:
                controlled_generate(engine, TARGET, spec, trace=trace if mode == "cached" else None, **kw)
            times[mode].append((time.perf_counter() - start) / steps)
            print(f"[timing] {model} {mode} repeat {r}: {times[mode][-1]:.3f} s/step", file=sys.stderr, flush=True)
    base = min(times["plain"]) if "plain" in times else None
    return [
        {"model": model, "mode": m, "size": size or engine.default_size, "steps": steps,
         "seconds_per_step_min": min(t), "seconds_per_step_all": t,
         "vs_plain": (min(t) / base) if base else None, "trace_bytes": trace.nbytes() if trace else 0}
        for m, t in times.items()
    ]
