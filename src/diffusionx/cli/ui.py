"""`diffusionx ui`: the web page for interactive sessions (docs/ui.md)."""

from __future__ import annotations

from ..ui import DEFAULT_PORT
from . import options

EXAMPLES = f"""
diffusionx ui                                   # then open http://127.0.0.1:{DEFAULT_PORT}/
diffusionx ui --cloud-url http://127.0.0.1:8000 --token $TOKEN
"""


def register(sub) -> None:
    p = options.command(sub, "ui", "the web page for interactive sessions (docs/ui.md)", EXAMPLES)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    options.model_options(p, random_seed=True)
    group = p.add_argument_group("session")
    group.add_argument("--edge-strength", type=options.strength, default=0.6, help="round-to-round strength")
    group.add_argument("--cloud-strength", type=options.strength, default=0.5, help="cloud refinement strength")
    options.cloud_url_options(group)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=options.lazy("diffusionx.ui.app", "run_ui"))
