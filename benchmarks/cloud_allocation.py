"""How much of cloud-only's attribute accuracy the refinements of stored final previews reach, at
fixed strengths and at the strengths a cloud predictor picks (numbers, not a test).

    python benchmarks/cloud_allocation.py ROWS.jsonl [--predictors DIR] [--floors 0.3,0.4,0.5] [--eps 0.02]

ROWS.jsonl: a cloud sweep table of `diffusionx predictors collect` (each row: one final preview
refined at every grid strength, one noise draw each, and its features). Cloud-only is each row's
strength-1.0 point. Rows the predictors were trained on flatter them: pass rows they never saw
(the shipped predictors were trained on pair5's rows; pair6's re-collected rows are new to them).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", help="cloud sweep table (predictors collect --directions cloud)")
    p.add_argument("--predictors", help="predictors folder (default: the shipped ones)")
    p.add_argument("--floors", default="0.3,0.4,0.5", help="cloud floors (min strength) to try")
    p.add_argument("--eps", type=float, default=0.02, help="the cloud tolerance of the choice rule")
    args = p.parse_args(argv)

    import json
    from pathlib import Path

    import numpy as np

    from diffusionx.predictors.collect import read_rows
    from diffusionx.predictors.curves import choose_strength
    from diffusionx.predictors.policies import ASSET_DIR
    from diffusionx.predictors.regressors import load_regressor

    folder = Path(args.predictors) if args.predictors else ASSET_DIR
    manifest = json.loads((folder / "predictors.json").read_text())
    table = read_rows(args.rows)
    header = next(r for r in table if r.get("kind") == "header")
    rows = [r for r in table if r.get("kind") == "cloud"]
    if header["feature_names"]["cloud"] != manifest["feature_names"]["cloud"]:
        raise SystemExit("the rows' cloud features are not the ones these predictors take")
    if [float(s) for s in header["grid"]] != [float(s) for s in manifest["grid"]]:
        raise SystemExit("the rows were swept over another strength grid than these predictors'")
    grid = np.asarray(manifest["grid"], dtype=np.float64)
    accuracy = np.array([r["attribute_accuracy"] for r in rows])
    clip = np.array([r["clip_score"] for r in rows])
    reference_acc, reference_clip = accuracy[:, -1].mean(), clip[:, -1].mean()

    def line(label: str, index: np.ndarray) -> str:
        picked = np.arange(len(rows)), index
        return (f"{label:<34} {grid[index].mean():>8.2f} {accuracy[picked].mean() / reference_acc:>12.1%} "
                f"{clip[picked].mean() / reference_clip:>10.1%}")

    print(f"{len(rows)} final previews ({args.rows}); cloud-only: attribute accuracy {reference_acc:.4f}, "
          f"CLIP {reference_clip:.2f}")
    print(f"{'strength choice':<34} {'strength':>8} {'attr. share':>12} {'CLIP share':>10}")
    for i, s in enumerate(grid[:-1]):
        print(line(f"fixed {s:g}", np.full(len(rows), i)))
    model = load_regressor(folder / manifest["cloud"]["file"])
    gaps = model.predict(np.array([r["features"] for r in rows], dtype=np.float32))
    for floor in (float(f) for f in args.floors.split(",")):
        chosen = [choose_strength(np.append(g, 0.0), eps=args.eps, min_strength=floor, grid=grid) for g in gaps]
        print(line(f"predictor, eps {args.eps:g}, floor {floor:g}", np.searchsorted(grid, np.array(chosen) - 1e-9)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
