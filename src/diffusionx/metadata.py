"""PNG metadata: the generation parameters as AUTOMATIC1111 writes them (the `parameters` text
chunk that ComfyUI, image viewers and prompt readers parse) plus DiffusionX's full report."""

from __future__ import annotations

import json
from typing import Any


def parameters_text(prompt: str, *, steps: int, seed: int, model: str, strength: float | None = None,
                    guidance: float = 7.5, size: tuple[int, int] | None = None) -> str:
    fields = [f"Steps: {steps}", "Sampler: DDIM", f"CFG scale: {guidance:g}", f"Seed: {seed}"]
    if size:
        fields.append(f"Size: {size[0]}x{size[1]}")
    fields.append(f"Model: {model}")
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    return f"{prompt}\n" + ", ".join(fields)


def png_info(image, *, prompt: str, steps: int, seed: int, model: str, strength: float | None = None,
             guidance: float = 7.5, report: dict[str, Any] | None = None):
    """A PngInfo with both chunks: `parameters` (A1111) and `diffusionx` (JSON report, seed included)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(prompt, steps=steps, seed=seed, model=model, strength=strength,
                                                guidance=guidance, size=image.size))
    info.add_text("diffusionx", json.dumps({"seed": seed, **(report or {})}))
    return info
