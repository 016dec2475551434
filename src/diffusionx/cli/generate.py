"""`diffusionx generate`: one text-to-image generation on either model of the pair, or on both (the
edge draws, the cloud refines).
"""

from __future__ import annotations

from pathlib import Path

from . import options

EXAMPLES = """
diffusionx generate "a large red circle on the left on a blue background"
diffusionx generate "a small yellow star in the top right" --side cloud --seed 7 --out star.png
diffusionx generate "a small yellow star in the top right" --policy learned    # edge, then the cloud refines
"""


def register(sub) -> None:
    p = options.command(sub, "generate", "one text-to-image generation", EXAMPLES)
    p.add_argument("prompt", type=options.prompt, help="what the image should show (`diffusionx vocab` lists the "
                                                       "words the embedded models know)")
    options.model_options(p)
    p.add_argument("--side", choices=("edge", "cloud", "pair"),
                   help="which model of the pair; pair: the edge draws, the cloud refines its latent at the "
                        "policy's strength, as a one-round session (default: edge, pair with --policy)")
    options.policy_option(p)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    options.out_option(p, "outputs/generate.png", "the PNG to write (prompt, seed and steps in its metadata)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InvalidInputError
    from .runtime import load_pair, save_image

    side = args.side or ("pair" if args.policy else "edge")
    if args.policy and side != "pair":
        raise InvalidInputError(f"--policy chooses the cloud's refinement strength, which only --side pair uses; "
                                f"drop --side {side} or use --side pair")
    pair = load_pair(args)
    steps = pair.steps_or_default(args.steps)
    if side == "pair":
        return refined_on_the_pair(args, pair, steps)
    engine = pair.edge if side == "edge" else pair.cloud
    gen = engine.generate(args.prompt, seed=args.seed, steps=steps, guidance_scale=args.guidance, progress=True)
    path = save_image(gen.image, Path(args.out), pair, prompt=args.prompt, steps=steps, seed=args.seed,
                      side=side, guidance=args.guidance, out_of_vocabulary=list(gen.unknown_words))
    info = pair.edge_info if side == "edge" else pair.cloud_info
    print(f"wrote {path} ({info.label}, {gen.unet_steps} steps, {gen.timing.total_s:.3f} s)")
    return 0


def refined_on_the_pair(args, pair, steps: int) -> int:
    """One round on the edge, finalized (refined) by the in-process cloud under the policy."""
    from ..session import EdgeSession
    from .runtime import save_final

    spec, policy = options.make_policy(args, pair)
    session = EdgeSession(pair, policy=policy, steps=steps, seed=args.seed, guidance_scale=args.guidance)
    preview = session.generate(args.prompt, progress=True)
    final = session.finalize()
    path = save_final(final, Path(args.out), pair, session)
    print(f"wrote {path} (policy {spec}: edge {preview.timing.total_s:.3f} s, the cloud refined at strength "
          f"{final.strength:.2f}, {final.unet_steps} U-Net steps, {final.cloud_seconds:.3f} s)")
    return 0
