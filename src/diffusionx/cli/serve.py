"""`diffusionx serve`: the cloud refinement service over HTTP (docs/serving.md)."""

from __future__ import annotations

from ..server.config import add_serve_arguments
from . import options

EXAMPLES = """
diffusionx serve --tokens tokens.txt                  # http://127.0.0.1:8000, docs at /docs
diffusionx serve --insecure --port 8001               # local use without tokens
diffusionx serve --ray --replicas 1 --max-replicas 4 --tokens tokens.txt
"""


def register(sub) -> None:
    p = options.command(sub, "serve", "the cloud refinement service over HTTP (docs/serving.md)", EXAMPLES)
    add_serve_arguments(p)
    p.set_defaults(func=options.lazy("diffusionx.server.run", "cmd_serve"))
