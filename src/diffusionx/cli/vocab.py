"""`diffusionx vocab`: the words and example prompts the embedded models know."""

from __future__ import annotations

from . import options


def register(sub) -> None:
    p = options.command(sub, "vocab", "the words and example prompts the embedded models know", "diffusionx vocab")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..world.captions import POSITION_PHRASES, SIZE_WORDS
    from ..world.vocab import COLORS, EXAMPLE_PROMPTS, SHAPES

    print("The embedded models know only their synthetic world: one to three objects on a plain background.")
    print("An object needs its shape; size, color and position may be left out, and so may the background.\n")
    print(f"shapes     {', '.join(SHAPES)}")
    print(f"colors     {', '.join(COLORS)}")
    print("sizes      " + "; ".join(f"{size}: {', '.join(words)}" for size, words in SIZE_WORDS.items()))
    print("positions  " + ", ".join(POSITION_PHRASES))
    print("           (as 'on the left', 'at the top', 'in the top right corner', 'in the middle', ...)")
    print("background '<color> background', 'on a <color> background', 'with a <color> backdrop'\n")
    print("examples:")
    for prompt in EXAMPLE_PROMPTS:
        print(f"  {prompt}")
    print("\nWith real models (--model sd15) any text works.")
    return 0
