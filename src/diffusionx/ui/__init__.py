"""`diffusionx ui`: the web page for interactive multi-round sessions (docs/ui.md).

Light on purpose: the web framework is imported only when the command runs, so `diffusionx --help`
works without the `ui` extras installed.
"""

from __future__ import annotations

import argparse

DEFAULT_PORT = 7860


def add_ui_arguments(p: argparse.ArgumentParser) -> None:
    """The `diffusionx ui` options; cli.py calls this and sets `cmd_ui` as the handler."""
    from ..models import PRESETS

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--cloud", metavar="URL", help="cloud service URL (diffusionx serve); default: in-process")
    p.add_argument("--token", help="bearer token for --cloud (also: $DIFFUSIONX_TOKEN)")
    p.add_argument("--model", default="embedded", choices=sorted(PRESETS), help="model pair preset")
    p.add_argument("--edge-model", help="edge model: a Hugging Face id or a diffusers folder (overrides the preset)")
    p.add_argument("--cloud-model", help="cloud model: a Hugging Face id or a diffusers folder")
    p.add_argument("--steps", type=int, default=20, help="scheduler steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="default seed of a new session")
    p.add_argument("--edge-strength", type=float, default=0.6, help="round-to-round strength (default 0.6)")
    p.add_argument("--cloud-strength", type=float, default=0.5, help="cloud refinement strength (default 0.5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def cmd_ui(args) -> int:
    from .app import run_ui

    return run_ui(args)
