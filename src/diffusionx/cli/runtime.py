"""What the commands share once they run: the model pair, the cloud client, images on disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def load_pair(args):
    from ..models import load_pair

    pair = load_pair(args.model, edge=getattr(args, "edge", None), cloud=getattr(args, "cloud", None),
                     preview_decoder=preview_decoder_arg(args))
    print(f"models: edge {pair.edge_info.label}, cloud {pair.cloud_info.label}", file=sys.stderr)
    return pair


def preview_decoder_arg(args) -> str | None:
    """--preview-decoder as `load_pair` takes it ("none" -> None; absent -> the default)."""
    value = getattr(args, "preview_decoder", "default")
    return None if value == "none" else value


def cloud_client(args):
    """The cloud service client when --cloud-url is given; None means in-process refinement."""
    if not getattr(args, "cloud_url", None):
        return None
    from ..client import CloudClient

    return CloudClient(args.cloud_url, args.token or os.environ.get("DIFFUSIONX_TOKEN"))


def save_image(image, path: Path, pair, *, prompt: str, steps: int, seed: int, side: str,
               strength: float | None = None, guidance: float = 7.5, **report: Any) -> Path:
    """Save a PNG with the generation's parameters (A1111 style) and the full report (`diffusionx`)."""
    from ..metadata import png_info

    info = png_info(image, prompt=prompt, steps=steps, seed=seed, model=getattr(pair, f"{side}_info").source,
                    strength=strength, guidance=guidance, report={"models": pair.describe(), **report})
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def save_round(r, path: Path, pair) -> Path:
    return save_image(r.image, path, pair, prompt=r.prompt, steps=r.steps, seed=r.seed, side="edge",
                      strength=r.strength, round=r.summary())


def save_final(final, path: Path, pair, session) -> Path:
    side = "cloud" if final.refined else "edge"
    seed = session.round(final.source_round).seed
    return save_image(final.image, path, pair, prompt=final.prompt, steps=final.steps, seed=seed, side=side,
                      strength=final.strength if final.refined else None, final=final.summary())


def strip(images: list, labels: list[str], cell: int = 192):
    """Side-by-side strip, small images upscaled (nearest) so a person can see them."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (cell * len(images), cell + 18), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, label) in enumerate(zip(images, labels)):
        out.paste(image.resize((cell, cell), Image.NEAREST), (i * cell, 0))
        draw.text((i * cell + 4, cell + 3), label, fill="black")
    return out


def write_session_outputs(session, final, out: Path, pair, wall: float) -> dict:
    """strip.png and report.json of a session (demo and session write the same); `final` may be None."""
    rounds = session.rounds
    images, labels = [r.image for r in rounds], [f"round {r.index} s={r.strength:.2f}" for r in rounds]
    if final is not None:
        images.append(final.image)
        labels.append("final (cloud)" if final.refined else "final (NOT refined)")
    out.mkdir(parents=True, exist_ok=True)
    if images:
        strip(images, labels).save(out / "strip.png")
    report = {"models": pair.describe(), "rounds": session.history(),
              "final": None if final is None else final.summary(), "wall_seconds": wall}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
