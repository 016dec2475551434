"""Strength policies built on the predictors; all implement `diffusionx.policies.StrengthPolicy`.

- `LearnedPolicy`: the edge and the cloud predictor each predict a gap curve; the strength is
  chosen from it by `curves.choose_strength` with the policy's eps / cost weight (runtime
  parameters, not part of the model).
- `LoadAwarePolicy`: the learned cloud choice, with a cost weight that grows with the cloud's
  estimated wait (the rule is in the class docstring) and a quality floor.
- `SimilarityRule`: a baseline in the spirit of NIRVANA: strength from prompt similarity alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelNotAvailableError
from .curves import DEFAULT_EPS, GRID, choose_strength, label, row_gaps
from .features import FeatureExtractor, SentenceEncoder
from .regressors import MLPRegressor, TreesRegressor, load_regressor

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "predictors"
MANIFEST = "predictors.json"


@dataclass
class Predictors:
    """The trained edge and cloud regressors and the feature extractor they were trained with."""

    edge_model: MLPRegressor | TreesRegressor
    cloud_model: MLPRegressor | TreesRegressor
    features: FeatureExtractor
    grid: tuple[float, ...] = GRID
    manifest: dict[str, Any] = field(default_factory=dict)

    def edge_gaps(self, previous_prompt: str, prompt: str, previous_latents: Any) -> np.ndarray:
        """Predicted q(s) - q(1.0) over the grid for re-generating from the previous latent."""
        x = self.features.edge(previous_prompt, prompt, previous_latents)
        return np.append(self.edge_model.predict(x), 0.0)

    def cloud_gaps(self, prompt: str, latents: Any) -> np.ndarray:
        """Predicted q(s) - q(cloud-only) over the grid for refining the final preview."""
        x = self.features.cloud(prompt, latents)
        return np.append(self.cloud_model.predict(x), 0.0)

    @classmethod
    def load(
        cls, folder: str | Path | None = None, engine: Any = None, features: FeatureExtractor | None = None
    ) -> Predictors:
        """Load from `folder` (default: $DIFFUSIONX_PREDICTORS, else the shipped ones). The text
        features come from `engine` (an `Engine` of the pair) or, without one, from the text
        encoder the manifest names."""
        if folder is None:
            folder = os.environ.get("DIFFUSIONX_PREDICTORS") or ASSET_DIR
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ModelNotAvailableError(
                f"no predictors in {folder} (missing {MANIFEST}); train them with "
                "`diffusionx predictors collect` and `diffusionx predictors train`"
            )
        manifest = json.loads(path.read_text())
        if features is None:
            features = FeatureExtractor.from_engine(engine) if engine is not None else _default_features(manifest)
        edge = load_regressor(folder / manifest["edge"]["file"])
        cloud = load_regressor(folder / manifest["cloud"]["file"])
        return cls(edge, cloud, features, tuple(manifest.get("grid", GRID)), manifest)


def _default_features(manifest: dict[str, Any]) -> FeatureExtractor:
    from ..models import EMBEDDED_DIR, load_pair

    if manifest.get("text_encoder") == "embedded" and (EMBEDDED_DIR / "pair.json").exists():
        try:  # only the text encoder and tokenizer, not the whole pair
            return FeatureExtractor.from_folder(EMBEDDED_DIR / "edge")
        except (OSError, ValueError):
            pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair = load_pair(manifest.get("text_encoder", "embedded"))
    return FeatureExtractor.from_engine(pair.edge)


class LearnedPolicy:
    """Edge and cloud strengths chosen from the predicted gap curves.

    edge_eps / cloud_eps: quality tolerance vs the reference (fresh edge generation / cloud-only);
    edge_eps None (default) takes the one `predictors tune` chose, else DEFAULT_EPS;
    edge_cost / cloud_cost: quality a whole unit of strength is worth giving up (0: pure eps rule);
    min_edge / min_cloud: lower bounds on the strength; None (default) takes the floors that
    `predictors tune` chose on validation sessions and wrote into the predictors' manifest
    (`policy_defaults`), or 0 where it has none."""

    def __init__(
        self,
        predictors: Predictors | None = None,
        *,
        edge_eps: float | None = None,
        cloud_eps: float = DEFAULT_EPS,
        edge_cost: float = 0.0,
        cloud_cost: float = 0.0,
        min_edge: float | None = None,
        min_cloud: float | None = None,
        folder: str | Path | None = None,
    ) -> None:
        self._predictors = predictors
        self._folder = folder
        self._edge_eps = None if edge_eps is None else float(edge_eps)
        self.cloud_eps = float(cloud_eps)
        self.edge_cost, self.cloud_cost = float(edge_cost), float(cloud_cost)
        self._min_edge = None if min_edge is None else float(min_edge)
        self._min_cloud = None if min_cloud is None else float(min_cloud)
        self.timings_s: list[float] = []  # predictor forward time per call (features excluded)

    @property
    def predictors(self) -> Predictors:
        if self._predictors is None:  # lazy: the bench builds policies before it loads models
            self._predictors = Predictors.load(self._folder)
        return self._predictors

    def _tuned(self, key: str, default: float = 0.0) -> float:
        return float(self.predictors.manifest.get("policy_defaults", {}).get(key, default))

    @property
    def edge_eps(self) -> float:
        return self._tuned("edge_eps", DEFAULT_EPS) if self._edge_eps is None else self._edge_eps

    @property
    def min_edge(self) -> float:
        return self._tuned("min_edge") if self._min_edge is None else self._min_edge

    @property
    def min_cloud(self) -> float:
        return self._tuned("min_cloud") if self._min_cloud is None else self._min_cloud

    def edge_strength(self, previous_prompt: str, prompt: str, previous_latents: torch.Tensor) -> float:
        gaps = self.predictors.edge_gaps(previous_prompt, prompt, previous_latents)
        return choose_strength(
            gaps, eps=self.edge_eps, cost_weight=self.edge_cost, min_strength=self.min_edge, grid=self.predictors.grid
        )

    def cloud_choice(
        self, prompt: str, latents: torch.Tensor, cost_weight: float, max_drop: float | None = None
    ) -> tuple[float, float]:
        """(strength, predicted gap at it) for a given cost weight."""
        gaps = self.predictors.cloud_gaps(prompt, latents)
        s = choose_strength(
            gaps,
            eps=self.cloud_eps,
            cost_weight=cost_weight,
            max_drop=max_drop,
            min_strength=self.min_cloud,
            grid=self.predictors.grid,
        )
        return s, float(gaps[list(self.predictors.grid).index(s)])

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        return self.cloud_choice(prompt, latents, self.cloud_cost)[0]


class LoadAwarePolicy(LearnedPolicy):
    """The learned policy whose cloud choice trades quality for fewer cloud steps under load.

    Rule (documented in docs/predictors.md): with W = the cloud's estimated wait in seconds
    (`estimated_wait_s` of GET /v1/load),

        cost_weight(W) = cloud_cost + wait_weight * W
        strength       = choose_strength(predicted cloud gaps, eps=cloud_eps,
                                         cost_weight=cost_weight(W), max_drop=max_drop)

    so each second of queue makes a unit of strength worth `wait_weight` more quality points;
    the strength is non-increasing in W and the predicted quality never goes below the floor
    q(cloud-only) - max_drop (the bounded amount of quality traded); the learned policy's tuned
    cloud floor does not apply (an explicit `min_cloud` does). Where the load comes from:
    the `load` argument if the caller passes one, else `load_source()` (e.g. `CloudClient.load`,
    or the server's in-process `service.load().as_dict`), else no load (W = 0)."""

    def __init__(
        self,
        predictors: Predictors | None = None,
        *,
        wait_weight: float = 0.01,
        max_drop: float = 0.05,
        load_source: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(predictors, **kwargs)
        if wait_weight < 0 or max_drop < 0:
            raise ValueError("wait_weight and max_drop must be >= 0")
        self.wait_weight, self.max_drop = float(wait_weight), float(max_drop)
        self.load_source = load_source

    @property
    def min_cloud(self) -> float:
        # Its quality bound is `max_drop`; the tuned cloud floor (an idle cloud's answer) would
        # leave no cloud steps to trade under load, so only an explicit floor applies.
        return 0.0 if self._min_cloud is None else self._min_cloud

    @staticmethod
    def wait_of(load: dict[str, Any] | None) -> float:
        if not load:
            return 0.0
        wait = load.get("estimated_wait_s")
        if wait is None:  # derive it from the queue if a report lacks the estimate
            wait = float(load.get("queue_depth", 0)) * float(load.get("step_time_s", 0.0))
        return max(0.0, float(wait))

    def cost_weight(self, wait_s: float) -> float:
        return self.cloud_cost + self.wait_weight * max(0.0, wait_s)

    def cloud_choice_at(self, prompt: str, latents: torch.Tensor, wait_s: float) -> tuple[float, float]:
        return self.cloud_choice(prompt, latents, self.cost_weight(wait_s), self.max_drop)

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        if load is None and self.load_source is not None:
            try:
                load = self.load_source()
            except Exception:  # no load report: behave as unloaded
                load = None
        return self.cloud_choice_at(prompt, latents, self.wait_of(load))[0]


class SimilarityRule:
    """Baseline: edge strength from the prompts' sentence similarity alone (NIRVANA-like):
    strength = 1 at similarity <= low, falling linearly to `min_strength` at similarity 1;
    the cloud strength is fixed."""

    def __init__(
        self, low: float = 0.5, min_strength: float = 0.3, cloud: float = 0.5, sentence: SentenceEncoder | None = None
    ) -> None:
        self.low, self.min_strength, self.cloud = float(low), float(min_strength), float(cloud)
        self._sentence = sentence

    @property
    def sentence(self) -> SentenceEncoder:
        if self._sentence is None:
            self._sentence = SentenceEncoder()
        return self._sentence

    def strength_for(self, similarity: float) -> float:
        t = (similarity - self.low) / max(1.0 - self.low, 1e-9)
        s = 1.0 - float(np.clip(t, 0.0, 1.0)) * (1.0 - self.min_strength)
        return float(np.clip(np.ceil(s * 10 - 1e-9) / 10, self.min_strength, 1.0))  # onto the 0.1 grid

    def edge_strength(self, previous_prompt: str, prompt: str, previous_latents: torch.Tensor) -> float:
        return self.strength_for(self.sentence.similarity(previous_prompt, prompt))

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        return self.cloud


class OraclePolicy:
    """Per-case best strengths read from a sweep table (`predictors collect`), a bound no
    predictor can beat: the edge label of each (previous prompt, prompt) transition and the cloud
    label of each final prompt, by the same eps rule as the training labels.

    Run the benchmark on the sessions and seeds the sweep used (`collect --test N` uses seed
    200000 + i for test session i: `bench --n N --seed 200000`); the collector continued each
    session from its label at `rollout_eps`, so with eps == rollout_eps the benchmark retraces the
    sweep's rounds exactly. A case the table lacks gets strength 1.0 (the reference), counted in
    `misses`."""

    def __init__(self, sweeps: str | Path | list[str | Path] | None = None, *, edge_eps: float = DEFAULT_EPS,
                 cloud_eps: float = DEFAULT_EPS, score_weight: float = 1.0) -> None:
        from .collect import read_rows  # collect imports the session and cloud modules: load it only when needed

        paths = [sweeps] if isinstance(sweeps, (str, Path)) else list(sweeps or [])
        if not paths:
            env = os.environ.get("DIFFUSIONX_ORACLE_SWEEPS")
            paths = env.split(os.pathsep) if env else []
        if not paths:
            raise ModelNotAvailableError(
                "the oracle needs a sweep of the benchmark's own sessions: run `diffusionx predictors collect "
                "--test N --out FILE` and pass FILE (bench: --oracle-sweeps FILE, then --seed 200000)"
            )
        self.edge: dict[tuple[str, str], float] = {}
        self.cloud: dict[str, float] = {}
        for path in paths:
            if not Path(path).is_file():
                raise ModelNotAvailableError(f"no sweep table at {path}: run `diffusionx predictors collect` first")
            for row in read_rows(path):
                if row.get("kind") not in ("edge", "cloud"):
                    continue
                gaps, grid = row_gaps(row, score_weight), row["strengths"]
                if row["kind"] == "edge":
                    self.edge[(row["previous_prompt"], row["prompt"])] = label(gaps, edge_eps, grid)
                else:
                    self.cloud[row["prompt"]] = label(gaps, cloud_eps, grid)
        if not self.edge and not self.cloud:
            raise ModelNotAvailableError(f"no edge or cloud sweep rows in {', '.join(map(str, paths))}")
        self.misses = 0

    def edge_strength(self, previous_prompt: str, prompt: str, previous_latents: torch.Tensor) -> float:
        return self._label(self.edge, (previous_prompt, prompt))

    def cloud_strength(self, prompt: str, latents: torch.Tensor, load: dict[str, Any] | None) -> float:
        return self._label(self.cloud, prompt)

    def _label(self, table: dict, key: Any) -> float:
        if key not in table:
            self.misses += 1
            return 1.0
        return table[key]


def time_prediction(predictors: Predictors, repeats: int = 200) -> dict[str, float]:
    """Median seconds of one prediction (regressor forward on a ready feature vector), and of
    feature extraction with warm caches, for the edge and the cloud model."""
    rng = np.random.default_rng(0)
    out = {}
    latents = torch.randn(1, 4, 16, 16)
    for name, model, feats in (
        (
            "edge",
            predictors.edge_model,
            lambda: predictors.features.edge("a red circle", "a blue circle on the left", latents),
        ),
        ("cloud", predictors.cloud_model, lambda: predictors.features.cloud("a blue circle on the left", latents)),
    ):
        x = feats()
        x = x + rng.normal(0, 1e-3, x.shape).astype(np.float32)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.predict(x)
            times.append(time.perf_counter() - t)
        ftimes = []
        for _ in range(max(10, repeats // 10)):
            t = time.perf_counter()
            feats()
            ftimes.append(time.perf_counter() - t)
        out[f"{name}_predict_s"] = float(np.median(times))
        out[f"{name}_features_cached_s"] = float(np.median(ftimes))
    return out
