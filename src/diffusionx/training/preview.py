"""Sample grids of a (possibly still training) embedded run: reference render, edge row, cloud row.

``python scripts/training_preview.py --out runs/embedded --png runs/grid.png`` uses the EMA
weights of the latest U-Net checkpoints (or the final weights once a stage is done), or
``--pipelines DIR`` for exported ``DIR/edge`` and ``DIR/cloud`` folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file


def checkpoint_pipeline(out_dir: str | Path, role: str):
    """Pipeline with the EMA weights of the latest checkpoint of `role`'s U-Net."""
    from .embedded import _new_unet, build_pipeline

    out_dir = Path(out_dir)
    final = out_dir / f"unet_{role}" / "final"
    if final.exists():
        return build_pipeline(out_dir, role)
    unet = _new_unet(role)
    unet.load_state_dict(load_file(str(out_dir / f"unet_{role}" / "ckpt" / "ema.safetensors")))
    return build_pipeline(out_dir, role, unet=unet)


@torch.no_grad()
def sample(pipe, prompts: list[str], *, steps: int = 20, guidance: float = 6.0, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               generator=g, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def grid_png(rows: dict[str, np.ndarray], prompts: list[str], path: str | Path, scale: int = 2) -> Path:
    """One row per entry of `rows` (label -> (n, 64, 64, 3) uint8), the prompt under each column."""
    n = len(prompts)
    cell = 64 * scale
    label_w, text_h = 60, 44
    img = Image.new("RGB", (label_w + n * cell, len(rows) * cell + text_h), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2), label, fill="black")
        for c in range(n):
            tile = Image.fromarray(images[c]).resize((cell, cell), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + c * cell, r * cell))
    for c, p in enumerate(prompts):
        words, lines, line = p.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > cell // 6:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((label_w + c * cell + 2, len(rows) * cell + 1), "\n".join(lines[:4]), fill="black",
                            spacing=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
