"""A grid of renders and model samples of test prompts, from a training run's checkpoints or from
pipeline folders (the drawing code: diffusionx.training.preview).

    python scripts/training_preview.py --out runs/embedded --png runs/grid.png
    python scripts/training_preview.py --pipelines src/diffusionx/assets/embedded --png grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diffusionx.training.data import split_scenes
from diffusionx.training.preview import checkpoint_pipeline, grid_png, sample
from diffusionx.world.captions import caption
from diffusionx.world.scene import render


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/embedded")
    ap.add_argument("--pipelines", default=None)
    ap.add_argument("--png", default="runs/grid.png")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--roles", default="edge,cloud")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(1234)
    scenes = split_scenes(rng, args.n, split="test")
    prompts = [caption(s, rng) for s in scenes]
    rows = {"render": np.stack([render(s) for s in scenes])}
    for role in args.roles.split(","):
        if args.pipelines:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(Path(args.pipelines) / role), local_files_only=True,
                                                           dtype=torch.float32)
        else:
            pipe = checkpoint_pipeline(args.out, role)
        pipe.set_progress_bar_config(disable=True)
        rows[role] = sample(pipe, prompts, steps=args.steps, guidance=args.guidance)
    print(grid_png(rows, prompts, args.png))
    for i, p in enumerate(prompts):
        print(i, p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
