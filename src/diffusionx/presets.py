"""Model pair presets by name. Torch-free, so the command line can list them at once."""

from __future__ import annotations

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# preset -> (edge source, cloud source). Sources are HF ids, folders or "builtin:<name>".
PRESETS: dict[str, tuple[str, str]] = {
    "embedded": ("builtin:embedded-edge", "builtin:embedded-cloud"),
    "untrained": ("builtin:untrained-edge", "builtin:untrained-cloud"),
    "random-sd15": ("builtin:random-tiny-sd", "builtin:random-sd15"),
    "sd15": ("segmind/tiny-sd", SD15),
    "bk-sdm-tiny": ("nota-ai/bk-sdm-tiny", SD15),
}
