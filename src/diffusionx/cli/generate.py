"""`diffusionx generate`: one text-to-image generation on either model of the pair."""

from __future__ import annotations

from pathlib import Path

from . import options

EXAMPLES = """
diffusionx generate "a large red circle on the left on a blue background"
diffusionx generate "a small yellow star in the top right" --side cloud --seed 7 --out star.png
"""


def register(sub) -> None:
    p = options.command(sub, "generate", "one text-to-image generation", EXAMPLES)
    p.add_argument("prompt", type=options.prompt, help="what the image should show (`diffusionx vocab` lists the "
                                                       "words the embedded models know)")
    options.model_options(p)
    p.add_argument("--side", choices=("edge", "cloud"), default="edge", help="which model of the pair")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    options.out_option(p, "outputs/generate.png", "the PNG to write (prompt, seed and steps in its metadata)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .runtime import load_pair, save_image

    pair = load_pair(args)
    engine = pair.edge if args.side == "edge" else pair.cloud
    steps = pair.steps_or_default(args.steps)
    gen = engine.generate(args.prompt, seed=args.seed, steps=steps, guidance_scale=args.guidance, progress=True)
    path = save_image(gen.image, Path(args.out), pair, prompt=args.prompt, steps=steps, seed=args.seed,
                      side=args.side, guidance=args.guidance, out_of_vocabulary=list(gen.unknown_words))
    info = pair.edge_info if args.side == "edge" else pair.cloud_info
    print(f"wrote {path} ({info.label}, {gen.unet_steps} steps, {gen.timing.total_s:.3f} s)")
    return 0
