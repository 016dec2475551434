"""Frechet distance between two sets of feature vectors (the "F" of FID), scipy-free.

The matrix square root uses symmetric eigendecompositions in float64:
    tr(sqrt(S_a S_b)) = tr(sqrt(sqrt(S_a) S_b sqrt(S_a)))
and sqrt(S_a) S_b sqrt(S_a) is symmetric positive semi-definite, so `eigvalsh` suffices.
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, 0.0, None)
    return (vectors * np.sqrt(values)) @ vectors.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)); 0 for identical sets.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two feature vectors in each set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.cov(a, rowvar=False)
    cov_b = np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2.0
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(value, 0.0)
