"""Strength policies: how much noise to add, round to round (edge) and for refinement (cloud).

A policy is any object with these two methods; the fixed one below is the baseline, the
predictors plug learned and load-aware ones in through the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .engine import check_strength


class StrengthPolicy(Protocol):
    def edge_strength(self, previous_prompt: str, prompt: str, previous_latents: torch.Tensor) -> float:
        """Strength for re-generating from the previous round's latent; 1.0 means start fresh."""
        ...

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        """Strength for the cloud's refinement of the final preview latent."""
        ...


@dataclass(frozen=True)
class FixedStrength:
    """The same strengths every time. edge=1.0 makes every round a fresh generation."""

    edge: float = 0.6
    cloud: float = 0.5

    def __post_init__(self) -> None:
        check_strength(self.edge)
        check_strength(self.cloud)

    def edge_strength(self, previous_prompt: str, prompt: str, previous_latents: torch.Tensor) -> float:
        return self.edge

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        return self.cloud
