"""Cost of Prompt-to-Prompt per mode (seconds per step, trace memory); the measuring code is
diffusionx.control.cost.

    python benchmarks/control_cost.py --model untrained --steps 20 --out outputs/control_cost
    python benchmarks/control_cost.py --model sd15 --size 512 --steps 2 --out outputs/control_cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from diffusionx.control.cost import MODES, interleaved, run_mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="untrained", help="embedded | untrained | sd15 | tiny-sd")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="outputs/control_cost")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleave", type=int, default=0,
        help="timing only: run the modes in one process, interleaved, this many times; report the min",
    )
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_mode(args.model, args.one, args.size, args.steps)))
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.interleave:
        rows = interleaved(args.model, args.modes.split(","), args.size, args.steps, args.interleave)
        path = out_dir / f"timing_{args.model}_{rows[0]['size']}.json"
        path.write_text(json.dumps(rows, indent=2))
        print(path)
        return 0
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
               "--one", mode]
        if args.size:
            cmd += ["--size", str(args.size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print(f"[cost] {args.model} {mode} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[cost] {row}", file=sys.stderr, flush=True)
        rows.append(row)
    path = out_dir / f"cost_{args.model}_{rows[0]['size']}.json"
    path.write_text(json.dumps(rows, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
