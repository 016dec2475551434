"""`diffusionx demo`: a scripted four-round session, finalized by the cloud model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import options

DEMO_PROMPTS = (
    "a large red circle on the left on a blue background",
    "a large red circle on the left and a small yellow star at the top right on a blue background",
    "a large green circle on the left and a small yellow star at the top right on a blue background",
    "a large green circle on the left and a small yellow star at the top right on a white background",
)

EXAMPLES = """
diffusionx demo
diffusionx demo --out outputs/demo --edge-strength 0.5 --cloud-strength 0.4 --round-mode sdedit
diffusionx demo --cloud-url http://127.0.0.1:8000 --token $TOKEN --require-cloud
"""


def register(sub) -> None:
    p = options.command(sub, "demo", "a scripted multi-round session, finalized by the cloud model", EXAMPLES,
                        description="Four rounds of edits on the edge model, then the cloud refines the last "
                                    "preview. Writes round_NN.png, final.png, strip.png and report.json.")
    options.model_options(p, previews=True)
    options.session_options(p)
    options.out_option(p, "outputs/demo", "output folder")
    p.set_defaults(func=run, round_mode="auto")  # the demo shows the product: each edit its measured mode


def run(args) -> int:
    from ..session import EdgeSession
    from .runtime import cloud_client, load_pair, save_final, save_round, write_session_outputs

    start = time.perf_counter()
    out = Path(args.out)
    pair = load_pair(args)
    spec, policy = options.make_policy(args, pair)
    session = EdgeSession(pair, policy=policy, steps=args.steps, seed=args.seed, cloud=cloud_client(args))
    print(f"policy {spec}, {session.steps} steps")
    for prompt in DEMO_PROMPTS:
        r = session.generate(prompt, progress=True, mode=args.round_mode)
        save_round(r, out / f"round_{r.index:02d}.png", pair)
    final = session.finalize(mode=args.finalize)
    save_final(final, out / "final.png", pair, session)
    wall = time.perf_counter() - start
    write_session_outputs(session, final, out, pair, wall)
    print(f"{'round':>5}  {'mode':<8} {'strength':>8} {'U-Net steps':>11} {'edge s':>7}  prompt")
    for r in session.rounds:
        print(f"{r.index:>5}  {r.mode:<8} {r.strength:>8.2f} {r.unet_steps:>11} {r.timing.total_s:>7.3f}  {r.prompt}")
    status = "refined" if final.refined else f"NOT refined: {final.reason}"
    print(
        f"final: cloud strength {final.strength:.2f}, {final.unet_steps} U-Net steps, "
        f"{final.cloud_seconds:.3f} s cloud, {final.bytes_up} B up / {final.bytes_down} B down ({status})"
    )
    print(f"wrote {out}/round_01.png .. final.png, strip.png, report.json in {wall:.1f} s")
    if pair.describe()["untrained"]:
        print("NOTE: the models are UNTRAINED stand-ins; the images are noise.")
    if not final.refined and args.require_cloud:
        print(f"error: the cloud did not refine the final ({final.reason}); --require-cloud makes that a failure",
              file=sys.stderr)
        return 1
    return 0
