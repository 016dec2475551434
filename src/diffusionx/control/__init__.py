"""Cross-attention control (Prompt-to-Prompt) for round-to-round edits. See docs/control.md.

    from diffusionx.control import ControlConfig, RoundSpec, controlled_generate
    prev = RoundSpec(prompt="a red circle on the left", seed=3)
    out = controlled_generate(engine, "a blue circle on the left", prev, steps=20)
"""

from .attention import ControlConfig, P2PAttnProcessor, Router, StepRecord, Term, Trace
from .controller import Branch, ControlledGeneration, PromptToPrompt, RoundSpec, blend_layers, controlled_generate
from .prompts import TokenEdit, align_words, make_edit, parse_weights, split_words, word_token_spans
from .rounds import LAYOUT_WORDS, MODES, auto_mode

__all__ = [
    "LAYOUT_WORDS",
    "MODES",
    "Branch",
    "ControlConfig",
    "ControlledGeneration",
    "P2PAttnProcessor",
    "PromptToPrompt",
    "RoundSpec",
    "Router",
    "StepRecord",
    "Term",
    "TokenEdit",
    "Trace",
    "align_words",
    "auto_mode",
    "blend_layers",
    "controlled_generate",
    "make_edit",
    "parse_weights",
    "split_words",
    "word_token_spans",
]
