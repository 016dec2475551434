"""Training data of the embedded world: rendered scenes of one split, with captions."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from ..world.captions import caption
from ..world.scene import Scene, random_scene, render, scene_split
from ..world.sessions import _apply_edit


def split_scenes(rng: np.random.Generator, n: int, split: str = "train") -> list[Scene]:
    """`n` random scenes whose content belongs to `split` (the test split is never trained on)."""
    out: list[Scene] = []
    while len(out) < n:
        s = random_scene(rng)
        if scene_split(s) == split:
            out.append(s)
    return out


def paired_scenes(rng: np.random.Generator, n_pairs: int, split: str = "train") -> list[Scene]:
    """2 * n_pairs scenes: each base scene followed by a one-attribute edit of it (hard negatives)."""
    out: list[Scene] = []
    for base in split_scenes(rng, n_pairs, split):
        other = None
        while other is None:
            edit = "change_background" if rng.random() < 0.2 else "change_attribute"
            edited = _apply_edit(base, base, edit, rng)
            cand = None if edited is None else edited[0]
            if cand is not None and cand != base and scene_split(cand) == split:
                other = cand
        out += [base, other]
    return out


def render_all(scenes: list[Scene], rng: np.random.Generator | None, size: int = 64,
               workers: int = 1) -> np.ndarray:
    """uint8 (n, size, size, 3); jittered when `rng` is given.

    With `workers` > 1 the scenes are rendered in chunks by a process pool; each chunk's jitter
    comes from its own seed drawn from `rng`: deterministic, the same for any `workers` > 1.
    """
    if workers > 1 and len(scenes) >= 4 * _CHUNK:
        starts = range(0, len(scenes), _CHUNK)
        seeds = [None] * len(starts) if rng is None else [int(v) for v in rng.integers(2**63, size=len(starts))]
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            parts = pool.starmap(_render_chunk, [(scenes[i:i + _CHUNK], seed, size) for i, seed in zip(starts, seeds)])
        return np.concatenate(parts)
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        out[i] = render(s, size=size, rng=rng)
    return out


_CHUNK = 1000


def _render_chunk(scenes: list[Scene], seed: int | None, size: int) -> np.ndarray:
    return render_all(scenes, None if seed is None else np.random.default_rng(seed), size)


def captions_for(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    return [caption(s, rng) for s in scenes]


def to_tensor_images(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
