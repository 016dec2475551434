"""`diffusionx ui`: the web page for interactive multi-round sessions (docs/ui.md).

Light on purpose: the web framework is imported only when the command runs (`app.run_ui`), so
`diffusionx --help` works without the `ui` extras installed. Its options: diffusionx.cli.ui.
"""

DEFAULT_PORT = 7860
