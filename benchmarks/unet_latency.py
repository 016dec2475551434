"""Per-step U-Net latency of the real architectures with random weights (no download needed).

Measures one denoising step as the engine runs it: batch 1 with classifier-free guidance, i.e.
one U-Net call on 2 samples, at 512x512 (64x64x4 latents) for SD v1.5 and Tiny-SD (BK-SDM-Tiny),
and at 64x64 (16x16x4 latents) for the embedded pair. Prints a table and writes JSON.

    python benchmarks/unet_latency.py [--models sd15 tiny_sd embedded_edge embedded_cloud]
                                      [--steps 3] [--warmup 1] [--threads N] [--out FILE]
                                      [--device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusionx.bench.harness import sync
from diffusionx.models import unet_config

LATENT_SIZE = {"sd15": 64, "tiny_sd": 64, "embedded_edge": 16, "embedded_cloud": 16}
TEXT = {"sd15": (77, 768), "tiny_sd": (77, 768), "embedded_edge": (77, 128), "embedded_cloud": (77, 128)}


def measure(name: str, steps: int, warmup: int, batch: int, cfg: bool, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_config(unet_config(name)).eval().requires_grad_(False).to(dev, dtype)
    build_s = time.perf_counter() - start
    rows = batch * (2 if cfg else 1)
    size = LATENT_SIZE[name]
    sample = torch.randn(rows, 4, size, size).to(dev, dtype)
    context = torch.randn(rows, *TEXT[name]).to(dev, dtype)
    timesteps = torch.full((rows,), 500, device=dev)
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            sync(dev)
            t0 = time.perf_counter()
            unet(sample, timesteps, encoder_hidden_states=context)
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in unet.parameters())
    del unet
    return {
        "model": name,
        "random_weight": True,
        "params_millions": round(params / 1e6, 1),
        "image_size": size * 8 if name in ("sd15", "tiny_sd") else size * 4,
        "latent": [4, size, size],
        "batch": batch,
        "cfg": cfg,
        "unet_rows": rows,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds_per_step_mean": statistics.mean(times),
        "seconds_per_step_min": min(times),
        "seconds_per_step_all": times,
        "build_seconds": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(LATENT_SIZE), choices=list(LATENT_SIZE))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-cfg", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="outputs/bench/unet_latency.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = []
    for name in args.models:
        r = measure(name, args.steps, args.warmup, args.batch, not args.no_cfg, args.device, dtype)
        results.append(r)
        print(
            f"{name:<15} {r['params_millions']:>7.1f}M params  {r['image_size']}x{r['image_size']}  "
            f"batch {r['batch']}{' +CFG' if r['cfg'] else ''} {r['device']} {r['dtype']}: "
            f"{r['seconds_per_step_mean']:.4f} s/step "
            f"(min {r['seconds_per_step_min']:.3f}, {args.steps} steps after {args.warmup} warm-up)",
            flush=True,
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    by_name = {r["model"]: r["seconds_per_step_mean"] for r in results}
    if "sd15" in by_name and "tiny_sd" in by_name:
        print(f"SD v1.5 / Tiny-SD per-step ratio: {by_name['sd15'] / by_name['tiny_sd']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
