"""Why the pinned calibration of 2026-11-26 is about twice today's (numbers, not a test): the
calibration measured in a process whose torch work runs on one OpenMP team (today's `load_pair`
loads on a short-lived thread), and in one with a second live team beside it (the pair loaded on
the main thread and another thread that has run a torch op and stays alive), where libgomp stops
spinning between parallel regions and every op pays a wake-up (docs/serving.md).

    python benchmarks/calibration_two_teams.py one    # today's process
    python benchmarks/calibration_two_teams.py two    # a second live team
"""

from __future__ import annotations

import sys
import threading


def main(argv: list[str] | None = None) -> int:
    teams = (argv or sys.argv[1:] or ["one"])[0]
    if teams not in ("one", "two"):
        raise SystemExit("usage: calibration_two_teams.py one|two")
    import torch

    import diffusionx.models as models
    from diffusionx.bench.harness import calibrate

    if teams == "two":
        models.call_in_short_lived_thread = lambda fn, *a, **k: fn(*a, **k)  # load on the main thread
    pair = models.load_pair(preview_decoder=None)
    if teams == "two":
        stop = threading.Event()

        def other_team() -> None:
            torch.ones(64, 64) @ torch.ones(64, 64)  # starts this thread's team
            stop.wait()

        threading.Thread(target=other_team, daemon=True).start()
    calib = calibrate(pair, repeats=7)
    for role in ("edge", "cloud"):
        print(f"{teams} team(s), {role}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in calib[role].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
