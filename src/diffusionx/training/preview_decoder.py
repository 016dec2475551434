"""A tiny preview decoder for the edge, distilled from the pair's VAE (TAESD's recipe, diffusers'
`AutoencoderTiny` format).

Every edge round decodes its preview, and the embedded VAE's decoder (group norms and an
attention block at 16x16) costs about as much as an edge U-Net step. A conv-only decoder trained to
reproduce the VAE's output from the same latents decodes a preview at a third of the cost; the
final image keeps the full VAE. What it costs in preview quality is measured on edge generations
of validation prompts (attribute accuracy of both decodes, PSNR between them) and lands in
`report.json` next to the weights.

    diffusionx train preview-decoder --out runs/preview_decoder \
        --export-to src/diffusionx/assets/embedded/preview_decoder

Targets are the VAE's own decodes (not the rendered scenes), so the tiny decoder learns the VAE's
mapping, off-manifold latents included: encoded world scenes and the edge U-Net's own generations.
The encoder half is trained too (to the VAE's scaled posterior mean), so the file is a whole
`AutoencoderTiny`, though the product only decodes with it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import adamw, cosine_lr
from .data import to_tensor_images
from .distill import encode_images, training_caption


@dataclass(frozen=True)
class PreviewDecoderConfig:
    channels: tuple[int, ...] = (32, 32, 32)  # per stage; two 2x upsamples take 16x16 latents to 64x64
    decoder_blocks: tuple[int, ...] = (2, 2, 1)  # depth where it is cheap: the 16x16 and 32x32 stages
    encoder_blocks: tuple[int, ...] = (1, 1, 1)
    world_images: int = 3000  # rendered train-split scenes, encoded by the VAE
    generated: int = 3000  # edge U-Net generations of training captions (unnamed backgrounds are the hard part)
    generation_steps: int = 10
    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    encoder_weight: float = 0.1
    validation: int = 256  # edge generations of validation prompts for the report
    seed: int = 0


SMOKE_PREVIEW_CONFIG = PreviewDecoderConfig(world_images=32, generated=16, steps=4, batch=8, validation=8,
                                            generation_steps=2)


def new_preview_decoder(cfg: PreviewDecoderConfig, latent_channels: int = 4):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=cfg.channels, decoder_block_out_channels=cfg.channels,
        num_encoder_blocks=cfg.encoder_blocks, num_decoder_blocks=cfg.decoder_blocks,
        latent_channels=latent_channels,
    )


def _captions(n: int, split: str, rng: np.random.Generator) -> list[str]:
    """Captions of `split` scenes as people write them (the pair's training captions)."""
    from ..world import random_scene
    from ..world.scene import scene_split

    out: list[str] = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene_split(scene) == split:
            out.append(training_caption(scene, rng))
    return out


@torch.no_grad()
def _generated_latents(engine, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    from ..bench.harness import Item, generate_batched

    items = [Item(p, seed + i) for i, p in enumerate(prompts)]
    latents = generate_batched(engine, items, steps=steps, guidance_scale=7.5, batch=64, desc="edge generations")
    return torch.cat(latents).float()


@torch.no_grad()
def _vae_decode(vae, latents: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """The VAE's pixels in [-1, 1] for U-Net-space latents."""
    out = [vae.decode(latents[k:k + batch] / vae.config.scaling_factor).sample.clamp(-1, 1)
           for k in range(0, len(latents), batch)]
    return torch.cat(out)


def build_data(pair, cfg: PreviewDecoderConfig) -> dict[str, torch.Tensor]:
    """Latents (U-Net space), the VAE's decodes of them, and for the encoder the rendered images
    with their posterior means."""
    from ..world import random_scene, render
    from ..world.scene import complete, scene_split

    rng = np.random.default_rng(cfg.seed)
    vae = pair.edge.vae
    scenes = []
    while len(scenes) < cfg.world_images:
        scene = complete(random_scene(rng), rng)
        if scene_split(scene) == "train":
            scenes.append(scene)
    images = np.stack([render(s, 64, rng) for s in tqdm(scenes, desc="render scenes", leave=False)])
    mean, std = encode_images(vae, images, "cpu")
    scaling = vae.config.scaling_factor
    sampled = (mean + std * torch.randn_like(mean)) * scaling  # a posterior sample per scene
    generated = _generated_latents(pair.edge, _captions(cfg.generated, "train", rng), cfg.generation_steps,
                                   seed=cfg.seed * 1_000_003)
    latents = torch.cat([sampled, generated])
    return {"latents": latents, "targets": _vae_decode(vae, latents), "pixels": to_tensor_images(images),
            "means": mean * scaling}


def train_preview_decoder(pair, out: str | Path, cfg: PreviewDecoderConfig = PreviewDecoderConfig(),
                          export_to: str | Path | None = None) -> dict[str, Any]:
    """Train, export (`AutoencoderTiny.save_pretrained`, safetensors) and report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = build_data(pair, cfg)
    model = new_preview_decoder(cfg, latent_channels=data["latents"].shape[1]).train()
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    n_lat, n_img = len(data["latents"]), len(data["pixels"])
    log = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="preview decoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=min(100, cfg.steps // 10 + 1))
        idx = torch.randint(0, n_lat, (cfg.batch,), generator=g)
        decoded = model.decode(data["latents"][idx]).sample
        target = data["targets"][idx]
        pixel_loss = F.mse_loss(decoded, target) + F.l1_loss(decoded, target)
        jdx = torch.randint(0, n_img, (max(1, cfg.batch // 4),), generator=g)  # the encoder is not on the hot path
        encoder_loss = F.mse_loss(model.encode(data["pixels"][jdx]).latents, data["means"][jdx])
        loss = pixel_loss + cfg.encoder_weight * encoder_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "pixel_loss": pixel_loss.item(), "encoder_loss": encoder_loss.item(),
                        "wall_s": round(time.time() - start, 1)})
            bar.set_postfix(pixel=f"{pixel_loss.item():.4f}", encoder=f"{encoder_loss.item():.3f}")
    model.eval()
    report = {"config": asdict(cfg), "train_wall_s": round(time.time() - start, 1), "log": log,
              **evaluate_preview_decoder(pair, model, cfg, grid=out / "preview_decoder_grid.png")}
    target = Path(export_to) if export_to else out / "export"
    model.save_pretrained(str(target), safe_serialization=True)
    (target / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _median_ms(fn, repeats: int = 30) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def evaluate_preview_decoder(pair, model, cfg: PreviewDecoderConfig, grid: Path | None = None) -> dict[str, Any]:
    """Both decodes of edge generations of validation prompts: attribute accuracy of each (the
    evaluator), PSNR of the tiny decode against the VAE's, and decode time at batch 1 (medians,
    interleaved)."""
    from ..metrics import get_evaluator
    from ..metrics.image import psnr
    from .preview import grid_png

    rng = np.random.default_rng(cfg.seed + 1)
    prompts = _captions(cfg.validation, "validation", rng)
    latents = _generated_latents(pair.edge, prompts, cfg.generation_steps, seed=10_000_019)
    to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    full = to_uint8(_vae_decode(pair.edge.vae, latents))
    tiny = to_uint8(torch.cat([model.decode(latents[k:k + 128]).sample for k in range(0, len(latents), 128)]))
    evaluator = get_evaluator()
    acc_full = evaluator.attribute_accuracy(list(full), prompts)["mean"]
    acc_tiny = evaluator.attribute_accuracy(list(tiny), prompts)["mean"]
    psnrs = [psnr(a, b) for a, b in zip(full, tiny)]
    one = latents[:1]
    vae = pair.edge.vae
    times = {"vae_ms": [], "tiny_ms": []}
    for _ in range(3):  # interleaved, so load on the machine shifts both alike
        times["vae_ms"].append(_median_ms(lambda: vae.decode(one / vae.config.scaling_factor)))
        times["tiny_ms"].append(_median_ms(lambda: model.decode(one)))
    if grid is not None:
        grid_png({"VAE": full[:8], "tiny": tiny[:8]}, prompts[:8], grid)
    return {
        "validation_images": len(prompts),
        "attribute_accuracy_vae": acc_full,
        "attribute_accuracy_tiny": acc_tiny,
        "psnr_tiny_vs_vae_db": float(np.mean(psnrs)),
        "psnr_tiny_vs_vae_db_p5": float(np.percentile(psnrs, 5)),
        "share_below_20db": float(np.mean(np.asarray(psnrs) < 20)),
        "decode_ms_batch1_vae": statistics.median(times["vae_ms"]),
        "decode_ms_batch1_tiny": statistics.median(times["tiny_ms"]),
        "decoder_params": sum(p.numel() for p in model.decoder.parameters()),
    }


__all__ = ["SMOKE_PREVIEW_CONFIG", "PreviewDecoderConfig", "evaluate_preview_decoder", "new_preview_decoder",
           "train_preview_decoder"]
