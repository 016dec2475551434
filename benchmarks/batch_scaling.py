"""Know the bound: U-Net step time t(b) for b = 1..16 requests per call and the throughput bound
b / (k * t(b)) for the load test's step mix, for the embedded cloud model and SD v1.5 at 512x512
(random weights), on the CPU or CUDA. Numbers, not a test.

    python benchmarks/batch_scaling.py [--models embedded sd15] [--batches 1 2 4 8 12 16]
                                       [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                       [--repeats 5] [--out benchmarks/results/batch_scaling_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusionx.models import unet_config
from diffusionx.server.capacity import LOAD_STRENGTHS, scaling_table, steps_per_refinement

# (U-Net config, latent (C, H, W), text states (tokens, width))
MODELS = {
    "embedded": ("embedded_cloud", (4, 16, 16), (77, 128)),
    "sd15": ("sd15", (4, 64, 64), (77, 768)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["embedded"], choices=sorted(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--steps", type=int, default=10, help="steps of the load test's schedule")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    k = steps_per_refinement(LOAD_STRENGTHS, args.steps)
    report = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "strengths": LOAD_STRENGTHS, "steps": args.steps, "k": k, "models": {}}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(args.device)
    for name in args.models:
        config, latent, text = MODELS[name]
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(unet_config(config)).eval().requires_grad_(False).to(args.device, dtype)
        start = time.perf_counter()
        rows = scaling_table(unet, args.batches, latent_shape=latent, text_shape=text, k=k, repeats=args.repeats)
        report["models"][name] = {"rows": rows, "wall_s": time.perf_counter() - start}
        print(f"\n{name} U-Net, {args.device} {args.dtype}, k = {k:g} steps per refinement "
              f"(strengths {LOAD_STRENGTHS} of {args.steps})")
        print(f"{'batch':>5} {'t(b) ms':>9} {'spread':>7} {'bound r/s':>10}")
        for row in rows:
            print(f"{row['batch']:>5} {row['step_s'] * 1000:>9.1f} {row['spread']:>7.0%} {row['bound_per_s']:>10.2f}")
        del unet
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
