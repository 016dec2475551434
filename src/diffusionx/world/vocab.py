"""The embedded world's fixed vocabulary (see DESIGN.md, "The embedded world").

Prompts written elsewhere use these words, so they never change.
"""

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan")
SIZES = ("small", "large")
POSITIONS = (
    "left", "right", "top", "bottom", "center",
    "top left", "top right", "bottom left", "bottom right",
)

# Words the caption grammar may use around the vocabulary. The tokenizer gives each of
# these (and the vocabulary above) a single token; any other text still tokenizes,
# character by character.
FUNCTION_WORDS = (
    "a", "an", "the", "one", "two", "three", "on", "in", "at", "of", "with", "and", "to", "is",
    "are", "near", "over", "by", "its", "side", "corner", "middle", "centre", "upper", "lower",
    "background", "backdrop", "big", "tiny", "little", "huge", "shape", "shapes", "object",
    "objects", "scene", "image", "picture", "showing", "plain", "colored", "coloured", "there",
    "also", "plus", "placed", "sitting", "located", "positioned", "some", "another", "single",
    "circles", "squares", "triangles", "stars", "hearts", "crosses", "rings",
)

# Prompts `diffusionx vocab` shows: complete ones and partial ones as people write them.
EXAMPLE_PROMPTS = (
    "a large red circle on the left on a blue background",
    "blue background, big red circle at the left",
    "a small yellow star in the top right corner and a green heart at the bottom on a white background",
    "a circle",
    "a red star in the top left",
    "heart, black background",
    "square on the left",
    "a blue background",
)
