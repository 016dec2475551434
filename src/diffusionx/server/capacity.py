"""What the hardware allows a refinement server: the U-Net step time t(b) for b requests in one
call (classifier-free guidance doubles the rows) and the throughput bound it implies.

With k U-Net steps per refinement, no server beats b / (k * t(b)) refinements/s at batch b: every
refinement needs k steps, and a step of b of them costs t(b). A load test that reaches 80% of this
has left little on the table; what is missing went to text encoding, VAE work, payload coding,
batch formation or waiting for a batch to fill.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence

import torch

# The load test's request mix: strengths of a `steps`-step schedule.
LOAD_STRENGTHS = (0.3, 0.5, 0.7, 0.9)


def steps_per_refinement(strengths: Sequence[float] = LOAD_STRENGTHS, steps: int = 10) -> float:
    """Mean U-Net steps k of a refinement in the mix (the engine runs ceil(strength * steps))."""
    return sum(max(1, math.ceil(s * steps - 1e-9)) for s in strengths) / len(strengths)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def step_time(unet: torch.nn.Module, batch: int, *, latent_shape: tuple[int, int, int], text_shape: tuple[int, int],
              guidance: bool = True, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one U-Net call for `batch` requests (2 rows each with guidance)."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    rows = batch * (2 if guidance else 1)
    sample = torch.randn(rows, *latent_shape, device=device, dtype=dtype)
    context = torch.randn(rows, *text_shape, device=device, dtype=dtype)
    timesteps = torch.full((rows,), 500, device=device, dtype=torch.long)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bound(batch: int, seconds_per_step: float, k: float) -> float:
    """Refinements/s no server can beat at batch `batch`: b / (k * t(b))."""
    return batch / (k * seconds_per_step)


def scaling_table(unet: torch.nn.Module, batches: Sequence[int], *, latent_shape: tuple[int, int, int],
                  text_shape: tuple[int, int], k: float, repeats: int = 5) -> list[dict]:
    """t(b) and the bound for each batch size, interleaved over repeats so that machine load
    drifting during the run affects every b alike."""
    samples: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(repeats):
        for b in batches:
            samples[b].append(step_time(unet, b, latent_shape=latent_shape, text_shape=text_shape, repeats=1,
                                        warmup=1))
    rows = []
    for b in batches:
        t = statistics.median(samples[b])
        rows.append({"batch": b, "step_s": t, "step_s_all": samples[b], "bound_per_s": bound(b, t, k),
                     "spread": (max(samples[b]) - min(samples[b])) / t if t else None})
    return rows


def share_of_bound(throughput: float, batch: float, table: list[dict]) -> tuple[float, float] | None:
    """(bound at the batch size the run reached, throughput / bound); the bound interpolated
    linearly in b between the measured sizes."""
    points = sorted((row["batch"], row["bound_per_s"]) for row in table)
    if not points:
        return None
    batch = min(max(batch, points[0][0]), points[-1][0])
    for (b0, v0), (b1, v1) in itertools.pairwise(points):
        if b0 <= batch <= b1:
            value = v0 if b1 == b0 else v0 + (v1 - v0) * (batch - b0) / (b1 - b0)
            return value, throughput / value
    value = points[0][1]  # a single measured size
    return value, throughput / value


def step_time_at(batch: float, table: list[dict]) -> float | None:
    """t(b) of `table` at `batch`, interpolated linearly between the measured sizes (clamped to
    them): what one U-Net call of that many requests costs with the machine to itself."""
    points = sorted((row["batch"], row["step_s"]) for row in table)
    if not points:
        return None
    batch = min(max(batch, points[0][0]), points[-1][0])
    for (b0, t0), (b1, t1) in itertools.pairwise(points):
        if b0 <= batch <= b1:
            return t0 if b1 == b0 else t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return points[0][1]
