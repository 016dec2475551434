"""The load-aware curve: cloud load (estimated wait) vs chosen strength vs predicted quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_curve(policy: Any, cases: list[tuple], waits: np.ndarray) -> dict[str, Any]:
    """Mean chosen cloud strength and mean predicted gap (quality vs cloud-only) per wait.
    A case is (prompt, latents) or (prompt, latents, measured gap curve over the policy's grid);
    with measured curves the mean measured gap at the chosen strength is reported too."""
    grid = list(policy.predictors.grid)
    strengths, gaps, measured = [], [], []
    for w in waits:
        choices = [policy.cloud_choice_at(case[0], case[1], float(w)) for case in cases]
        strengths.append(float(np.mean([c[0] for c in choices])))
        gaps.append(float(np.mean([c[1] for c in choices])))
        real = [case[2][grid.index(c[0])] for case, c in zip(cases, choices) if len(case) > 2]
        measured.append(float(np.mean(real)) if real else None)
    out = {
        "wait_s": [float(w) for w in waits],
        "strength": strengths,
        "predicted_gap": gaps,
        "floor_gap": -policy.max_drop,
        "wait_weight": policy.wait_weight,
        "n_cases": len(cases),
    }
    if any(m is not None for m in measured):
        out["measured_gap"] = measured
    return out


def plot_load_curve(curve: dict[str, Any], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(curve["wait_s"], curve["strength"], "o-", color="tab:blue", label="chosen cloud strength (mean)")
    ax.set_xlabel("cloud estimated wait (s)  [GET /v1/load: estimated_wait_s]")
    ax.set_ylabel("cloud strength", color="tab:blue")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    ax2.plot(
        curve["wait_s"], curve["predicted_gap"], "s--", color="tab:red", label="predicted quality - cloud-only (mean)"
    )
    if curve.get("measured_gap"):
        ax2.plot(
            curve["wait_s"],
            curve["measured_gap"],
            "^:",
            color="tab:orange",
            label="measured quality - cloud-only (mean, sweep)",
        )
    ax2.axhline(curve["floor_gap"], color="tab:red", lw=0.8, ls=":", label="quality floor (-max_drop)")
    ax2.set_ylabel("predicted quality gap", color="tab:red")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    ax.set_title(title or f"load-aware cloud policy ({curve['n_cases']} cases, wait weight {curve['wait_weight']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
