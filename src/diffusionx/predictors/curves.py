"""Quality curves and how a strength is chosen from one.

A *curve* is the quality reached at each strength of `GRID` for one case (one round-to-round
transition on the edge, or one final preview refined by the cloud). Quality is

    q = attribute_accuracy + score_weight * clip_score / 100

(both from the independent evaluator; score_weight defaults to 1). The *reference* is the
strength-1.0 point of the same case: a fresh edge generation for the edge direction, the
cloud-only from-scratch generation for the cloud direction (strength 1 ignores the input latent,
so it is exactly that). The predictors learn the *gap* curve g(s) = q(s) - q(1.0); g(1.0) = 0.

Choosing a strength from a (measured or predicted) gap curve, with policy parameters

- `eps`: quality tolerance (same units as q): strengths with g(s) >= -eps are "good enough";
- `cost_weight`: quality a whole unit of strength (all N U-Net steps) is worth giving up;
- `max_drop`: hard quality floor: g(s) >= -max_drop is required (None = no floor);
- `min_strength`: never choose below it,

is the rule

    s* = argmin_s  cost_weight * s + max(0, -eps - g(s))      over allowed s, ties -> smaller s
    allowed = {s in GRID : s >= min_strength and (max_drop is None or g(s) >= -max_drop)} + {1.0}

With cost_weight = 0 this is the *label*: the smallest strength whose quality is within eps of
the reference (or, if none is, the strength with the smallest shortfall). A larger cost weight
accepts a shortfall of up to cost_weight x (strength saved) to run fewer steps. Because the
objective's cost term grows with cost_weight and the allowed set does not depend on it, s* is
non-increasing in cost_weight — the load-aware policy relies on that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_EPS = 0.02
_TIE = 1e-9


def quality(attribute_accuracy: Sequence[float], clip_score: Sequence[float], score_weight: float = 1.0) -> np.ndarray:
    """Combined quality per strength (see the module docstring)."""
    return np.asarray(attribute_accuracy, dtype=np.float64) + score_weight * np.asarray(clip_score, np.float64) / 100.0


def row_gaps(row: dict, score_weight: float = 1.0) -> np.ndarray:
    """The gap curve of one sweep-table row (`predictors collect`): its quality over the grid,
    relative to its own strength-1.0 reference."""
    return gap_curve(quality(row["attribute_accuracy"], row["clip_score"], score_weight))


def gap_curve(q: Sequence[float]) -> np.ndarray:
    """q(s) - q(1.0): the last grid point is the reference."""
    q = np.asarray(q, dtype=np.float64)
    return q - q[-1]


def choose_strength(
    gaps: Sequence[float],
    *,
    eps: float = DEFAULT_EPS,
    cost_weight: float = 0.0,
    max_drop: float | None = None,
    min_strength: float = 0.0,
    grid: Sequence[float] = GRID,
) -> float:
    """The strength the rule in the module docstring picks from a gap curve over `grid`."""
    g = np.asarray(gaps, dtype=np.float64)
    s = np.asarray(grid, dtype=np.float64)
    if g.shape != s.shape:
        raise ValueError(f"gap curve has {g.shape[0]} points but the grid has {s.shape[0]}")
    if eps < 0 or cost_weight < 0 or (max_drop is not None and max_drop < 0):
        raise ValueError("eps, cost_weight and max_drop must be >= 0")
    allowed = s >= min_strength - _TIE
    if max_drop is not None:
        allowed &= g >= -max_drop - _TIE
    allowed[-1] = True  # the reference itself is always allowed
    objective = cost_weight * s + np.maximum(0.0, -eps - g)
    objective = np.where(allowed, objective, np.inf)
    best = objective.min()
    index = int(np.flatnonzero(objective <= best + _TIE)[0])  # smallest strength among ties
    return float(s[index])


def label(gaps: Sequence[float], eps: float = DEFAULT_EPS, grid: Sequence[float] = GRID) -> float:
    """Oracle label: the smallest strength within eps of the reference."""
    return choose_strength(gaps, eps=eps, cost_weight=0.0, grid=grid)


def nearest_index(strength: float, grid: Sequence[float] = GRID) -> int:
    """Index of the grid strength nearest to `strength`."""
    return int(np.argmin(np.abs(np.asarray(grid) - strength)))


def gap_at(gaps: Sequence[float], strength: float, grid: Sequence[float] = GRID) -> float:
    """The measured gap at a grid strength."""
    return float(np.asarray(gaps)[nearest_index(strength, grid)])
