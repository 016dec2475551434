"""Noise-level (strength) predictors: edge (round to round) and cloud (refinement), load-aware.

    from diffusionx.predictors import LearnedPolicy, LoadAwarePolicy
    policy = LearnedPolicy(Predictors.load(engine=pair.edge), edge_eps=0.02, cloud_eps=0.02)
    EdgeSession(pair, policy=policy)

See docs/predictors.md: the sweep table (`collect`), the models (`train`), the choice rule
(`curves.choose_strength`) and the load-aware rule.
"""

from .._lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {
    ".curves": ("DEFAULT_EPS", "GRID", "choose_strength", "gap_curve", "label", "quality"),
    ".features": ("FeatureExtractor", "SentenceEncoder"),
    ".policies": ("ASSET_DIR", "LearnedPolicy", "LoadAwarePolicy", "OraclePolicy", "Predictors", "SimilarityRule",
                  "time_prediction"),
    ".regressors": ("MLPRegressor", "TreesRegressor", "load_regressor"),
})

__all__ = [
    "ASSET_DIR",
    "DEFAULT_EPS",
    "GRID",
    "FeatureExtractor",
    "LearnedPolicy",
    "LoadAwarePolicy",
    "MLPRegressor",
    "OraclePolicy",
    "Predictors",
    "SentenceEncoder",
    "SimilarityRule",
    "TreesRegressor",
    "choose_strength",
    "gap_curve",
    "label",
    "load_regressor",
    "quality",
    "time_prediction",
]
