"""Metrics of the embedded world: an independent CLIP-style evaluator (score, FID features,
attribute accuracy) and the Frechet distance.

    from diffusionx.metrics import Evaluator, fid
    ev = Evaluator.load()
    ev.clip_score(images, prompts)          # (N,) 100 x cosine, clipped at 0
    ev.image_features(images)               # (N, 256) FID features
    ev.attribute_accuracy(images, prompts)  # {"mean", "per_image", "unparseable", ...}
    fid(images, reference_images)           # FID in the evaluator's feature space
"""

from .evaluator import (
    FEATURE_DIM,
    REBUILD_COMMAND,
    Evaluator,
    EvaluatorWeightsError,
    default_weights_path,
    fid,
    get_evaluator,
)
from .fid import frechet_distance
from .train import evaluator_report, train_evaluator

__all__ = [
    "FEATURE_DIM",
    "REBUILD_COMMAND",
    "Evaluator",
    "EvaluatorWeightsError",
    "default_weights_path",
    "evaluator_report",
    "fid",
    "frechet_distance",
    "get_evaluator",
    "train_evaluator",
]
