"""A saved benchmark's session latencies modelled again under other calibrations (numbers, not a
test): what a change of machine timing, or of the preview decoder, does to every "vs cloud-only"
figure, from the very sessions the run generated (nothing is generated again).

    python benchmarks/latency_under.py RESULTS.json --calibration A.json [--calibration B.json ...]
        [--profile laptop-gpu] [--vae-previews]

Each calibration gives one column block. `--vae-previews` adds, for each calibration that times
the preview decoder, a block with preview rounds charged the VAE's decode instead: the same run
as it would be without the decoder (the decoder changes images, never latents or step counts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a results.json written by `diffusionx bench`")
    p.add_argument("--calibration", action="append", required=True, metavar="FILE")
    p.add_argument("--profile", default="laptop-gpu")
    p.add_argument("--vae-previews", action="store_true", help="also model every preview decoded by the VAE")
    args = p.parse_args(argv)

    from diffusionx.bench import get_profile, latency_under, read_calibration

    report = json.loads(Path(args.results).read_text())
    profile = get_profile(args.profile)
    columns: dict[str, dict[str, float]] = {}
    for path in args.calibration:
        calib = read_calibration(path)
        columns[Path(path).name] = latency_under(report, calib, profile)
        if args.vae_previews and "preview_decode_s" in calib["edge"]:
            vae_only = {**calib, "edge": {**calib["edge"], "preview_decode_s": calib["edge"]["decode_s"]}}
            columns[f"{Path(path).name}, VAE previews"] = latency_under(report, vae_only, profile)
    names = list(report["methods"])
    print(f"profile {profile.name}; session latency in s (x cloud-only)\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        cells = [f"{col[name]:.3f} ({col[name] / col['cloud-only']:.3f}x)" for col in columns.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
