"""A saved benchmark's finals split by the kind of final prompt (numbers, not a test): each method's
CLIP score and attribute accuracy as a share of cloud-only's, paired over sessions with a 95%
interval, for complete prompts (every attribute named) vs partial ones, partial ones split by
whether an earlier round of the session named an attribute the final prompt leaves open (a refined
session keeps that drawing, a fresh one does not), and by the last edit.

    python benchmarks/finals_by_prompt.py RESULTS.json [--sessions FILE]

RESULTS.json must come from a `diffusionx bench` that kept per-image scores (`clip_score_per_image`);
the sessions are the run's own: the embedded test split unless `--sessions` names the file it ran.
Nothing is generated again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _share(values: list, baseline: list) -> str:
    from diffusionx.bench.run import paired_ratio_ci95

    r = paired_ratio_ci95(values, baseline)
    return f"{r['ratio']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]" if r else "n/a"


def names_an_open_attribute_earlier(session: dict) -> bool:
    """Does an earlier round name the background, or an attribute of an object of the same shape,
    that the final prompt leaves open?"""
    final, earlier = session["rounds"][-1]["scene"], [r["scene"] for r in session["rounds"][:-1] if r["scene"]]
    if final["background"] is None and any(scene["background"] is not None for scene in earlier):
        return True
    return any(
        obj[attribute] is None and other["shape"] == obj["shape"] and other[attribute] is not None
        for obj in final["objects"]
        for attribute in ("color", "size", "position")
        for scene in earlier
        for other in scene["objects"]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a results.json written by `diffusionx bench`")
    p.add_argument("--sessions", help="the sessions file the run used (default: the embedded test split)")
    args = p.parse_args(argv)

    from diffusionx.bench import load_sessions
    from diffusionx.world.scene import Scene

    report = json.loads(Path(args.results).read_text())
    methods = report["methods"]
    if "clip_score_per_image" not in methods.get("cloud-only", {}):
        raise SystemExit(f"{args.results}: no per-image CLIP scores with a cloud-only run (rerun `diffusionx bench`)")
    sessions, _ = load_sessions(args.sessions, report["workload"]["n_sessions"])
    finals = [s["rounds"][-1] for s in sessions]
    groups: dict[str, list[int]] = {}
    for i, (session, final) in enumerate(zip(sessions, finals)):
        complete = final["scene"] is not None and Scene.from_dict(final["scene"]).is_complete
        groups.setdefault("complete prompt" if complete else "partial prompt", []).append(i)
        if not complete and final["scene"] is not None:
            earlier = names_an_open_attribute_earlier(session)
            groups.setdefault(f"partial prompt, open attribute {'named' if earlier else 'never named'} earlier",
                              []).append(i)
        groups.setdefault(f"last edit: {final.get('edit') or 'none'}", []).append(i)

    cloud = methods["cloud-only"]
    print("share of cloud-only's finals, paired over sessions [95% interval]\n")
    print("| finals | sessions | method | CLIP score | attribute accuracy |")
    print("|---|---|---|---|---|")
    for group, index in sorted(groups.items(), key=lambda g: (g[0].startswith("last edit"), g[0])):
        for name, m in methods.items():
            if name == "cloud-only" or "clip_score_per_image" not in m:
                continue
            clip, attributes = (_share([m[key][i] for i in index], [cloud[key][i] for i in index])
                                for key in ("clip_score_per_image", "attribute_accuracy_per_image"))
            print(f"| {group} | {len(index)} | {name} | {clip} | {attributes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
