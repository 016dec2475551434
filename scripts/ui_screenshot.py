"""Remake docs/ui-screenshot.png: a scripted session on the page, in headless Chromium.

    python scripts/ui_screenshot.py [--model embedded] [--out docs/ui-screenshot.png]

Needs the `ui` extras (Playwright) and a Chromium (Debian's `chromium`; --chromium PATH).
Three rounds, a branch from round 1, a fourth round, Finalize with the in-process cloud.
"""

from __future__ import annotations

import argparse
import shutil

PROMPTS = (
    "a large red circle on the left on a blue background",
    "a large red circle on the left and a small yellow star at the top right on a blue background",
    "a large red circle on the left and a small yellow star at the top right on a white background",
    "a large green circle on the left on a blue background",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the session's seed (the page's default is random)")
    parser.add_argument("--out", default="docs/ui-screenshot.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from diffusionx.models import load_pair
    from diffusionx.server.run import start_in_thread
    from diffusionx.ui.app import UIState, create_app

    state = UIState(load_pair(args.model), steps=args.steps, seed=args.seed)
    ui = start_in_thread(create_app(state), graceful_timeout=5)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(ui.url)
            page.wait_for_selector("body[data-ready='1']")
            for i, prompt in enumerate(PROMPTS, start=1):
                if i == 4:
                    page.click("#history .round[data-round='1']")
                    page.wait_for_selector("#history .round.head[data-round='1']")
                page.fill("#prompt", prompt)
                page.press("#prompt", "Enter")
                page.wait_for_function(f"document.querySelectorAll('#history .round').length === {i}")
                page.wait_for_selector("#progress-box", state="hidden")
            page.click("#finalize")
            page.wait_for_selector("#final", state="visible")
            page.wait_for_function("document.querySelector('#final-refined').complete")
            page.evaluate("document.querySelector('#message').hidden = true")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        ui.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
