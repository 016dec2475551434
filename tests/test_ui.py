"""The web UI end to end: the real page in headless Chromium (Debian's `chromium`, driven by
Playwright without its own browser download), against the UI server and a real cloud service on
loopback, with the untrained model pair (fast, 64x64)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffusionx.client import CloudClient
from diffusionx.server.app import create_app as create_cloud_app
from diffusionx.server.run import start_in_thread
from diffusionx.ui.app import SESSION_FORMAT, UIState, create_app

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("DIFFUSIONX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "ui-test-token"
STEPS = 10
PROMPT_LIMIT = 200
PROMPTS = (
    "a large red circle on the left on a blue background",
    "a large red circle on the left and a small yellow star at the top right on a blue background",
    "a large green circle on the left and a small yellow star at the top right on a blue background",
)
BRANCH_PROMPT = "a large red circle on the left on a white background"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "ui-screenshot.png"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[ui]' for the browser tests")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DIFFUSIONX_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def start_cloud(pair, port: int = 0):
    return start_in_thread(create_cloud_app(pair.cloud, tokens={TOKEN}, max_batch=4), port=port, graceful_timeout=5)


def start_ui(pair, cloud_url: str):
    client = CloudClient(cloud_url, TOKEN, retries=1, backoff=0.05, connect_timeout=2)
    state = UIState(pair, cloud=client, cloud_label=cloud_url, steps=STEPS, max_prompt_chars=PROMPT_LIMIT)
    return start_in_thread(create_app(state), graceful_timeout=5), client


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))
    page = context.new_page()
    page.set_default_timeout(90_000)  # a shared, busy machine
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#untrained").is_visible()  # the page says the models are stand-ins


def submit(page, prompt: str, rounds_after: int) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelectorAll('#history .round').length === {rounds_after}")
    page.wait_for_selector("#progress-box", state="hidden")


def message(page) -> str:
    page.wait_for_selector("#message", state="visible")
    return page.inner_text("#message")


def image_loaded(page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth === 64; }",
        arg=selector,
    )


def download(page, selector: str) -> bytes:
    with page.expect_download() as info:
        page.click(selector)
    return Path(info.value.path()).read_bytes()


def test_three_rounds_branch_finalize_download_and_load(untrained_pair, browser, page, tmp_path):
    import time

    # The page polls progress every 150 ms; on a fast machine a 10-step round of the untrained
    # model ends before the first poll. 40 ms per edge U-Net call makes each render span polls.
    slow = untrained_pair.edge.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.04))
    cloud = start_cloud(untrained_pair)
    ui, client = start_ui(untrained_pair, cloud.url)
    try:
        open_page(page, ui.url)

        # bad input is a message on the page, and the session survives it
        page.click("#generate")
        assert "empty" in message(page)
        page.fill("#prompt", "a red circle " * 20)
        page.click("#generate")
        assert f"limit is {PROMPT_LIMIT}" in message(page)
        assert "over" in page.get_attribute("#count", "class")

        # three rounds; the progress indicator shows while each renders
        page.fill("#prompt", PROMPTS[0])
        page.press("#prompt", "Enter")
        page.wait_for_selector("#progress-box", state="visible")
        page.wait_for_function("document.querySelectorAll('#history .round').length === 1")
        page.wait_for_selector("#progress-box", state="hidden")
        assert page.inner_text("#current-info .info-made") == "made: fresh, from noise"
        submit(page, PROMPTS[1], 2)
        submit(page, PROMPTS[2], 3)
        assert "from round 2 at strength 0.60 (SDEdit)" in page.inner_text("#current-info .info-made")
        assert "sdedit" in page.inner_text("#current-info .info-mode")
        assert "U-Net" in page.inner_text("#current-info .info-cost")
        assert page.evaluate("window.__dx.maxStepSeen") >= 1  # step progress was polled during renders
        image_loaded(page, "#current-img")

        # branch from round 1: the next round starts from round 1's latent
        page.click("#history .round[data-round='1']")
        page.wait_for_selector("#history .round.head[data-round='1']")
        assert "branches from round 1" in page.inner_text("#branch-note")
        assert page.locator("#message").is_hidden()  # said once, beside the Generate button
        submit(page, BRANCH_PROMPT, 4)
        assert "from round 1 at strength 0.60" in page.inner_text("#current-info .info-made")
        assert page.get_attribute("#history .round.head", "data-round") == "4"

        # finalize through the cloud service; a second press while it runs gets a message
        page.click("#finalize")
        page.click("#finalize")
        assert "already running" in message(page)
        page.wait_for_selector("#final", state="visible")
        page.wait_for_selector("#message", state="hidden")  # the second press's error ended with the Finalize
        image_loaded(page, "#final-refined")
        image_loaded(page, "#final-preview")
        assert page.inner_text("#refined-caption") == "refined by the cloud"
        assert page.locator("#cloud-down").is_hidden()
        stats = page.inner_text("#final-stats")
        for word in ("edge time", "transfer", "cloud queue", "cloud compute", "strength", "0.50"):
            assert word in stats

        # downloads: the final PNG and the session JSON with every round
        final_png = Image.open(io.BytesIO(download(page, "#download-png")))
        assert final_png.size == (64, 64) and "diffusionx" in final_png.info
        saved = tmp_path / "session.json"
        saved.write_bytes(download(page, "#download-json"))
        doc = json.loads(saved.read_text())
        assert doc["format"] == SESSION_FORMAT and doc["head"] == 4 and doc["steps"] == STEPS
        assert [r["prompt"] for r in doc["rounds"]] == [*PROMPTS, BRANCH_PROMPT]
        assert [r["parent"] for r in doc["rounds"]] == [None, 1, 2, 1]
        assert [r["strength"] for r in doc["rounds"]] == [1.0, 0.6, 0.6, 0.6]
        assert len({r["seed"] for r in doc["rounds"]}) == 1 and str(doc["seed"]) == page.input_value("#seed")
        for r in doc["rounds"]:
            assert r["edge_seconds"] > 0 and r["timing"]["unet_calls"] == r["unet_steps"]
        assert doc["final"]["refined"] and doc["final"]["strength"] == 0.5 and doc["final"]["cloud_seconds"] > 0

        page.screenshot(path=str(tmp_path / "ui-finished.png"), full_page=True)
        if os.environ.get("DIFFUSIONX_UPDATE_SCREENSHOT"):
            shutil.copyfile(tmp_path / "ui-finished.png", DOCS_SCREENSHOT)
        originals = [page.request.get(ui.url + f"/api/s/{doc_sid(page)}/round/{i}.png").body() for i in range(1, 5)]

        # another tab is another session; loading the saved file there replays it exactly
        other = page.context.new_page()
        open_page(other, ui.url)
        assert other.locator("#history .round").count() == 0
        assert doc_sid(other) != doc_sid(page)
        other.set_input_files("#load-file", str(saved))
        other.wait_for_function("document.querySelectorAll('#history .round').length === 4")
        assert "4 rounds replayed" in message(other)
        assert other.get_attribute("#history .round.head", "data-round") == "4"
        replayed = [other.request.get(ui.url + f"/api/s/{doc_sid(other)}/round/{i}.png").body() for i in range(1, 5)]
        assert replayed == originals
        assert page.locator("#history .round").count() == 4  # the first tab is untouched

        # a file that is not a session is a message, not a stack trace
        bad = tmp_path / "bad.json"
        bad.write_text('{"format": "something else"}')
        other.set_input_files("#load-file", str(bad))
        other.wait_for_function("document.querySelector('#message').textContent.includes('not a DiffusionX')")
        assert other.locator("#history .round").count() == 4
    finally:
        slow.remove()
        ui.stop()
        client.close()
        cloud.stop()


def doc_sid(page) -> str:
    return page.evaluate("window.__dx.sid")


def test_cloud_down_keeps_the_preview_and_retry_refines(untrained_pair, browser, page, tmp_path):
    cloud = start_cloud(untrained_pair)
    port = int(cloud.url.rsplit(":", 1)[1])
    ui, client = start_ui(untrained_pair, cloud.url)
    try:
        open_page(page, ui.url)
        submit(page, PROMPTS[0], 1)
        cloud.stop()

        page.click("#finalize")
        page.wait_for_selector("#cloud-down", state="visible")
        text = page.inner_text("#cloud-message")
        assert "could not be reached" in text and "preview is kept" in text and cloud.url in text
        assert "NOT refined" in page.inner_text("#refined-caption")
        image_loaded(page, "#final-refined")
        preview = page.request.get(ui.url + f"/api/s/{doc_sid(page)}/round/1.png").body()
        kept = Image.open(io.BytesIO(download(page, "#download-png")))
        assert kept.tobytes() == Image.open(io.BytesIO(preview)).tobytes()  # the preview, unchanged
        page.screenshot(path=str(tmp_path / "ui-cloud-down.png"), full_page=True)

        cloud = start_cloud(untrained_pair, port=port)  # the cloud comes back; Retry refines
        page.click("#retry")
        page.wait_for_function("document.querySelector('#refined-caption').textContent === 'refined by the cloud'")
        assert page.locator("#cloud-down").is_hidden()
    finally:
        ui.stop()
        client.close()
        cloud.stop()


def test_round_modes_from_the_page_and_controlled_rounds_replay(untrained_pair, browser, page, tmp_path):
    state = UIState(untrained_pair, steps=6)  # in-process cloud
    if "controlled" not in state.modes:
        pytest.skip("this EdgeSession.generate has no mode argument")
    ui = start_in_thread(create_app(state), graceful_timeout=5)
    try:
        open_page(page, ui.url)
        assert page.locator("#mode-box").is_visible()
        submit(page, PROMPTS[0], 1)
        page.select_option("#mode", "controlled")
        submit(page, PROMPTS[0].replace("red", "green"), 2)
        assert page.inner_text("#current-info .info-made").startswith("made: attention-controlled, from round 1")
        assert "controlled" in page.inner_text("#history .round[data-round='2']")
        page.select_option("#mode", "fresh")
        submit(page, PROMPTS[1], 3)
        assert page.inner_text("#current-info .info-made") == "made: fresh, from noise"

        saved = tmp_path / "session.json"
        saved.write_bytes(download(page, "#download-json"))
        assert [r["mode"] for r in json.loads(saved.read_text())["rounds"]] == ["fresh", "controlled", "fresh"]
        originals = [page.request.get(ui.url + f"/api/s/{doc_sid(page)}/round/{i}.png").body() for i in (1, 2, 3)]

        other = page.context.new_page()
        open_page(other, ui.url)
        other.set_input_files("#load-file", str(saved))
        other.wait_for_function("document.querySelectorAll('#history .round').length === 3")
        replayed = [other.request.get(ui.url + f"/api/s/{doc_sid(other)}/round/{i}.png").body() for i in (1, 2, 3)]
        assert replayed == originals
        assert "controlled" in other.inner_text("#history .round[data-round='2']")

        # in-process Finalize: the page says there is no network in between
        other.click("#finalize")
        other.wait_for_selector("#final", state="visible")
        assert "in-process" in other.inner_text("#final-stats")
    finally:
        ui.stop()


def test_cli_has_the_ui_command():
    from diffusionx.cli import build_parser

    args = build_parser().parse_args(
        ["ui", "--port", "7999", "--cloud-url", "http://127.0.0.1:1", "--model", "untrained"]
    )
    assert (args.port, args.cloud_url, args.model, args.host) == (7999, "http://127.0.0.1:1", "untrained", "127.0.0.1")
    assert args.func.__qualname__ == "diffusionx.ui.app.run_ui"


def test_the_apps_shutdown_stops_its_render_thread(untrained_pair):
    import threading

    from fastapi.testclient import TestClient

    state = UIState(untrained_pair, steps=2)
    with TestClient(create_app(state)) as client:  # the context runs the app's start-up and shutdown
        assert client.get("/api/config").status_code == 200
        tab = state.create()
        render_thread = state.on_render_thread(tab, threading.current_thread)
        assert render_thread is not threading.current_thread() and render_thread.is_alive()
    render_thread.join(timeout=10)
    assert not render_thread.is_alive()


def test_progress_counts_steps_and_serves_intermediate_previews(untrained_pair):
    """Deterministic: look at the progress from inside the render, at every U-Net call."""
    from fastapi.testclient import TestClient

    state = UIState(untrained_pair, steps=6)
    client = TestClient(create_app(state))
    tab = state.get(client.post("/api/session").json()["id"])
    seen, previews = [], []

    def spy(module, args, output):
        progress = client.get(f"/api/s/{tab.id}/progress").json()
        seen.append((progress["phase"], progress["step"], progress["total"]))
        if progress["step"] in (3, 5):  # the render decodes what step 3 asked for at its next U-Net call
            previews.append(client.get(f"/api/s/{tab.id}/progress.png"))

    with state.busy(tab, "generate"), state.render(tab, untrained_pair.edge, "rendering"):
        handle = untrained_pair.edge.unet.register_forward_hook(spy)  # runs after the UI's own hook
        try:
            tab.edge.generate(PROMPTS[0])
        finally:
            handle.remove()
    assert seen == [("rendering", step, 6) for step in range(1, 7)]
    assert previews[0].status_code == 404  # asked from inside the render, which cannot decode meanwhile
    assert previews[1].status_code == 200 and Image.open(io.BytesIO(previews[1].content)).size == (64, 64)
    assert client.get(f"/api/s/{tab.id}/progress").json()["phase"] == "idle"
    assert "start" not in vars(untrained_pair.edge)  # the engine is left as it was
    assert not untrained_pair.edge.unet._forward_hooks


def test_every_render_runs_on_the_one_render_thread(untrained_pair):
    """A second thread running torch ops keeps a second OpenMP team, which slows every op (ui/state.py)."""
    import threading

    from fastapi.testclient import TestClient

    client = TestClient(create_app(UIState(untrained_pair, steps=2)))
    sid = client.post("/api/session").json()["id"]
    threads = set()
    hooks = [engine.unet.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
             for engine in (untrained_pair.edge, untrained_pair.cloud)]
    try:
        for call, body in (("generate", {"prompt": PROMPTS[0]}), ("generate", {"prompt": PROMPTS[1]}),
                           ("variation", None), ("finalize", {"strength": 0.5})):
            assert client.post(f"/api/s/{sid}/{call}", json=body).status_code == 200, call
    finally:
        for hook in hooks:
            hook.remove()
    assert len(threads) == 1 and next(iter(threads)).startswith("diffusionx-render")


def test_a_remote_finalize_takes_the_render_thread_only_for_the_edges_work(untrained_pair):
    """The round trip to a remote cloud runs on the request's thread: other tabs keep rendering
    meanwhile. The edge's own work (the strength policy, the final's decode) stays on the render thread."""
    import threading

    from fastapi.testclient import TestClient

    cloud = start_cloud(untrained_pair)
    client = CloudClient(cloud.url, TOKEN, retries=0, connect_timeout=2)
    round_trip_threads, decode_threads = [], []
    send = client.refine

    def recording_refine(request, **kwargs):
        round_trip_threads.append(threading.current_thread().name)
        return send(request, **kwargs)

    client.refine = recording_refine
    hook = untrained_pair.edge.vae.decoder.register_forward_hook(
        lambda *_: decode_threads.append(threading.current_thread().name))
    try:
        with TestClient(create_app(UIState(untrained_pair, cloud=client, cloud_label=cloud.url, steps=2))) as http:
            sid = http.post("/api/session").json()["id"]
            assert http.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0]}).status_code == 200
            decode_threads.clear()
            final = http.post(f"/api/s/{sid}/finalize", json={"strength": 0.5}).json()["final"]
    finally:
        hook.remove()
        cloud.stop()
    assert final["refined"] is True
    assert len(round_trip_threads) == 1 and not round_trip_threads[0].startswith("diffusionx-render")
    assert decode_threads and all(name.startswith("diffusionx-render") for name in decode_threads)


def test_seed_strength_steps_variation_and_round_downloads(untrained_pair):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(UIState(untrained_pair, steps=4)))
    seeds = {client.post("/api/session").json()["seed"] for _ in range(4)}
    assert len(seeds) > 1  # a random seed per session, not always 0
    sid = client.post("/api/session").json()["id"]
    first = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "seed": 11, "steps": 3}).json()
    assert first["round"]["seed"] == 11 and first["round"]["steps"] == 3 and first["seed"] == 11
    second = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[1], "strength": 0.4}).json()["round"]
    assert (second["seed"], second["strength"], second["parent"], second["steps"]) == (11, 0.4, 1, 3)
    varied = client.post(f"/api/s/{sid}/variation").json()["round"]
    assert varied["prompt"] == PROMPTS[1] and varied["parent"] == 1 and varied["strength"] == 0.4
    assert varied["seed"] != 11 and varied["index"] == 3
    response = client.get(f"/api/s/{sid}/round/3.png?download=1")
    assert 'filename="diffusionx-round-03.png"' in response.headers["content-disposition"]
    image = Image.open(io.BytesIO(response.content))
    prompt, fields = image.info["parameters"].split("\n")
    assert prompt == PROMPTS[1] and f"Seed: {varied['seed']}" in fields and "Denoising strength: 0.4" in fields
    assert client.post(f"/api/s/{sid}/generate", json={"prompt": "a circle", "steps": 0}).status_code == 422
    fresh = client.post("/api/session").json()["id"]
    assert client.post(f"/api/s/{fresh}/variation").status_code == 422  # nothing to vary yet


def test_variation_and_round_download_from_the_page(untrained_pair, browser, page):
    cloud = start_cloud(untrained_pair)
    ui, _ = start_ui(untrained_pair, cloud.url)
    try:
        open_page(page, ui.url)
        def shown_seed() -> int:  # the whole number: a new random seed may start with 5
            return int(re.search(r"^seed: (\d+)$", page.inner_text("#current-info"), re.MULTILINE).group(1))

        page.fill("#seed", "5")
        submit(page, PROMPTS[0], 1)
        assert shown_seed() == 5
        page.click("#variation")
        page.wait_for_function("document.querySelectorAll('#history .round').length === 2")
        page.wait_for_selector("#progress-box", state="hidden")
        assert shown_seed() != 5  # a new seed, shown in the field too
        assert page.input_value("#seed") == str(shown_seed())
        saved = Image.open(io.BytesIO(download(page, "#history .round[data-round='1'] .save")))
        assert re.search(r"\bSeed: 5\b", saved.info["parameters"])
        assert page.get_attribute("#history .round.head", "data-round") == "2"  # the download did not branch
    finally:
        ui.stop()
        cloud.stop()


def test_policy_selector_sets_the_sessions_policy(untrained_pair):
    from fastapi.testclient import TestClient

    from diffusionx.predictors import SimilarityRule

    state = UIState(untrained_pair, steps=3)
    client = TestClient(create_app(state))
    assert {"fixed", "learned", "load-aware", "similarity-rule"} <= set(client.get("/api/config").json()["policies"])
    sid = client.post("/api/session").json()["id"]
    done = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "policy": "similarity-rule"}).json()
    assert done["policy"] == "similarity-rule" and isinstance(state.get(sid).edge.policy, SimilarityRule)
    bad = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[1], "policy": "magic"})
    assert bad.status_code == 422 and "unknown policy" in bad.json()["error"]
    assert client.get(f"/api/s/{sid}").json()["rounds"][0]["prompt"] == PROMPTS[0]  # the session is kept


def test_new_tabs_start_with_the_servers_default_policy_and_fixed_stays_the_servers_strengths(untrained_pair):
    from diffusionx.cli import build_parser
    from diffusionx.policies import FixedStrength
    from diffusionx.predictors import SimilarityRule
    from diffusionx.ui.app import build_state

    def state_for(*flags):
        return build_state(build_parser().parse_args(["ui", "--model", "untrained", "--state", "memory", *flags]))

    state = state_for("--policy", "similarity-rule", "--cloud-strength", "0.3")
    client = ui_client(state)
    sid = client.post("/api/session").json()["id"]
    assert client.get(f"/api/s/{sid}").json()["policy"] == "similarity-rule"  # what the selector shows
    assert isinstance(state.get(sid).edge.policy, SimilarityRule)
    done = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "steps": 2, "policy": "fixed"}).json()
    assert done["policy"] == "fixed" and state.get(sid).edge.policy is state.policy == FixedStrength(0.6, 0.3)
    plain = state_for()  # the untrained pair's own default: fixed
    assert plain.default_policy == "fixed" and plain.create().edge.policy is plain.policy == FixedStrength()
    named = state_for("--policy", "fixed-0.4-0.2")  # a fixed spec sets the page's fixed strengths
    assert named.default_policy == "fixed" and named.policy == FixedStrength(0.4, 0.2)


def test_a_tab_keeps_the_default_policy_it_started_with_across_a_restart(untrained_pair, tmp_path):
    from diffusionx.predictors import SimilarityRule

    path = tmp_path / "ui.sqlite3"
    first = stored_state(untrained_pair, path, default_policy="similarity-rule")
    client = ui_client(first)
    sid = client.post("/api/session").json()["id"]
    assert client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "steps": 2}).status_code == 200
    first.store.close()
    second = stored_state(untrained_pair, path)  # restarted with fixed strengths as the default
    restored = second.get(sid)
    assert restored.policy == "similarity-rule" and isinstance(restored.edge.policy, SimilarityRule)
    assert second.create().edge.policy is second.policy  # new tabs take the new default


# ----- durable sessions: a restart of `diffusionx ui` keeps every tab's rounds --------------------
def ui_client(state):
    from fastapi.testclient import TestClient

    return TestClient(create_app(state))


def stored_state(pair, path, **kwargs):
    from diffusionx.ui.store import SQLiteSessionStore

    return UIState(pair, steps=4, store=SQLiteSessionStore(path, **kwargs.pop("store", {})), **kwargs)


def snapshot(client, sid: str) -> dict:
    state = client.get(f"/api/s/{sid}").json()
    doc = client.get(f"/api/s/{sid}/session.json").json()
    doc.pop("saved_at")
    final = client.get(f"/api/s/{sid}/final.png?download=1")
    return {
        "state": state,
        "doc": doc,
        "pngs": [client.get(f"/api/s/{sid}/round/{r['index']}.png?download=1").content for r in state["rounds"]],
        "final": final.content if final.status_code == 200 else final.status_code,
    }


def test_a_restart_keeps_every_tabs_rounds_head_seed_steps_policy_and_final(untrained_pair, tmp_path):
    from diffusionx.predictors import SimilarityRule

    path = tmp_path / "ui.sqlite3"
    first = stored_state(untrained_pair, path)
    client = ui_client(first)
    a, b, c = (client.post("/api/session").json()["id"] for _ in range(3))
    body = {"prompt": PROMPTS[0], "seed": 11, "steps": 3, "policy": "similarity-rule"}
    assert client.post(f"/api/s/{a}/generate", json=body).status_code == 200
    client.post(f"/api/s/{a}/generate", json={"prompt": PROMPTS[1], "strength": 0.4})
    client.post(f"/api/s/{a}/generate", json={"prompt": PROMPTS[2]})
    client.post(f"/api/s/{a}/back", json={"round": 2})
    assert client.post(f"/api/s/{a}/finalize", json={}).json()["final"]["refined"]
    client.post(f"/api/s/{b}/generate", json={"prompt": BRANCH_PROMPT})
    before = {sid: snapshot(client, sid) for sid in (a, b, c)}
    assert before[a]["state"]["head"] == 2 and len(before[a]["pngs"]) == 3 and isinstance(before[a]["final"], bytes)
    first.store.close()  # the server stops

    second = stored_state(untrained_pair, path)  # ... and starts again over the same file
    client = ui_client(second)
    assert not second.sessions  # read back lazily, when a tab asks
    after = {sid: snapshot(client, sid) for sid in (a, b, c)}
    for sid in (a, b, c):
        assert after[sid] == before[sid]  # rounds, head, seed, steps, policy, final; images byte for byte
    restored = second.get(a)
    edge = restored.edge
    assert (edge.seed, edge.steps, edge.head, restored.policy) == (11, 3, 2, "similarity-rule")
    assert isinstance(restored.edge.policy, SimilarityRule)
    assert after[b]["state"]["rounds"][0]["prompt"] == BRANCH_PROMPT and after[c]["state"]["rounds"] == []
    assert after[a]["state"]["final"]["source_round"] == 2


def test_a_restored_session_continues_exactly_as_the_live_one(untrained_pair, tmp_path):
    import torch

    def first_rounds(client, sid):
        client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "seed": 5, "steps": 3})
        controlled = "controlled" if "controlled" in client.app.state.ui.modes else None
        client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0].replace("red", "green"), "mode": controlled})

    def next_rounds(client, sid):
        controlled = "controlled" if "controlled" in client.app.state.ui.modes else None
        assert client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[1]}).status_code == 200  # SDEdit
        client.post(f"/api/s/{sid}/back", json={"round": 2})
        done = client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[2], "mode": controlled})
        assert done.status_code == 200, done.text  # controlled from a restored controlled round

    live = ui_client(UIState(untrained_pair, steps=4))
    live_sid = live.post("/api/session").json()["id"]
    first_rounds(live, live_sid)
    next_rounds(live, live_sid)

    path = tmp_path / "ui.sqlite3"
    before = stored_state(untrained_pair, path)
    client = ui_client(before)
    sid = client.post("/api/session").json()["id"]
    first_rounds(client, sid)
    before.store.close()
    after = stored_state(untrained_pair, path)
    client = ui_client(after)
    next_rounds(client, sid)

    expected, got = live.app.state.ui.get(live_sid).edge.rounds, after.get(sid).edge.rounds
    assert [r.mode for r in got] == [r.mode for r in expected]
    for want, have in zip(expected, got, strict=True):
        assert have.latents.dtype == want.latents.dtype
        assert torch.equal(have.latents, want.latents)  # the next round SDEdits from these: identical
        assert have.image.tobytes() == want.image.tobytes()


def test_stored_latents_keep_their_dtype_and_a_write_is_one_transaction(tmp_path):
    import sqlite3

    import torch

    from diffusionx.engine import Timing
    from diffusionx.session import Round
    from diffusionx.ui.store import SQLiteSessionStore, StoredRound, round_from_record, round_record

    store = SQLiteSessionStore(tmp_path / "ui.sqlite3")
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    rounds = []
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16), start=1):
        latents = (torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(i)) * 3).to(dtype)
        rounds.append(Round(i, "a circle", 7, 1.0 if i == 1 else 0.6, 3, 3, "fresh" if i == 1 else "sdedit",
                            None if i == 1 else i - 1, latents, image, Timing(unet_s=0.5, unet_calls=3)))
    store.save("s1", {"head": 3}, [round_record(r) for r in rounds])
    loaded = store.load("s1")
    for want, record in zip(rounds, loaded.rounds, strict=True):
        have = round_from_record(record)
        assert have.latents.dtype == want.latents.dtype and torch.equal(have.latents, want.latents)
        assert have.summary() == want.summary() and have.image.tobytes() == image.tobytes()

    broken = StoredRound(4, {"index": 4}, b"latents", object())  # fails half way through the write
    with pytest.raises(sqlite3.Error):
        store.save("s1", {"head": 4}, [round_record(rounds[0]), broken])
    again = store.load("s1")
    assert again.settings == {"head": 3} and [r.index for r in again.rounds] == [1, 2, 3]  # nothing half written


def test_a_corrupt_or_unknown_stored_session_is_a_404_not_a_500(untrained_pair, tmp_path):
    import sqlite3

    path = tmp_path / "ui.sqlite3"
    state = stored_state(untrained_pair, path)
    client = ui_client(state)
    sids = [client.post("/api/session").json()["id"] for _ in range(4)]
    for sid in sids:
        client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0], "steps": 2})
    state.store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE sessions SET settings = '{not json' WHERE id = ?", (sids[0],))
    db.execute("UPDATE rounds SET latents = x'00ff' WHERE session = ?", (sids[1],))
    db.execute("UPDATE sessions SET settings = json_set(settings, '$.format', 'other/9') WHERE id = ?", (sids[2],))
    db.execute("UPDATE rounds SET image = x'89504e47' WHERE session = ?", (sids[3],))
    db.commit()
    db.close()

    client = ui_client(stored_state(untrained_pair, path))
    unknown = client.get("/api/s/no-such-session")
    assert unknown.status_code == 404 and "no longer on the server" in unknown.json()["error"]
    for sid in sids:
        for response in (client.get(f"/api/s/{sid}"), client.get(f"/api/s/{sid}/round/1.png"),
                         client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[1]})):
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert "no longer on the server" in error and "could not be restored" in error  # the page starts anew
    assert "other/9" in client.get(f"/api/s/{sids[2]}").json()["error"]
    assert client.post("/api/session").status_code == 200  # the server goes on


def test_the_memory_bound_is_a_cache_and_old_stored_sessions_are_evicted(untrained_pair, tmp_path, monkeypatch):
    from diffusionx.ui import state as ui_state

    monkeypatch.setattr(ui_state, "MAX_SESSIONS", 2)
    now = [1_000_000.0]
    path = tmp_path / "ui.sqlite3"
    state = stored_state(untrained_pair, path, store={"clock": lambda: now[0]})
    client = ui_client(state)
    sids = [client.post("/api/session").json()["id"] for _ in range(3)]
    client.post(f"/api/s/{sids[0]}/generate", json={"prompt": PROMPTS[0], "steps": 2})
    client.post(f"/api/s/{sids[1]}/generate", json={"prompt": PROMPTS[0], "steps": 2})
    client.post(f"/api/s/{sids[2]}/generate", json={"prompt": PROMPTS[0], "steps": 2})
    assert len(state.sessions) == 2
    for sid in sids:  # dropped from memory, read back from the file
        assert len(client.get(f"/api/s/{sid}").json()["rounds"]) == 1
    state.store.close()

    now[0] += 6.9 * 86400  # within the default 7 days: kept
    state = stored_state(untrained_pair, path, store={"clock": lambda: now[0]})
    assert ui_client(state).get(f"/api/s/{sids[0]}").status_code == 200 and state.store.count() == 3
    state.store.close()
    now[0] += 0.2 * 86400  # past it: deleted from disk at start
    state = stored_state(untrained_pair, path, store={"clock": lambda: now[0]})
    assert state.store.count() == 0
    assert ui_client(state).get(f"/api/s/{sids[1]}").status_code == 404


def test_cli_state_option_default_file_and_memory(untrained_pair, tmp_path, monkeypatch):
    import diffusionx.models
    from diffusionx.cli import build_parser
    from diffusionx.errors import InvalidInputError
    from diffusionx.ui import state as ui_state
    from diffusionx.ui.app import build_state

    monkeypatch.setattr(diffusionx.models, "load_pair", lambda *a, **k: untrained_pair)
    monkeypatch.setenv("DIFFUSIONX_STATE_DIR", str(tmp_path / "state"))
    parse = build_parser().parse_args
    base = ["ui", "--model", "untrained", "--steps", "2"]

    default = build_state(parse(base))
    assert default.store.path == (tmp_path / "state" / "ui-sessions.sqlite3").resolve() and default.store.path.exists()
    assert default.store.max_age_s == 7 * 86400
    default.store.close()
    days = build_state(parse([*base, "--state", f"sqlite:///{tmp_path}/x.sqlite3", "--session-max-age", "2"]))
    assert days.store.path == (tmp_path / "x.sqlite3").resolve() and days.store.max_age_s == 2 * 86400
    days.store.close()
    with pytest.raises(SystemExit):
        parse([*base, "--session-max-age", "0"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidInputError, match="cannot open the UI's session store"):
        build_state(parse([*base, "--state", str(tmp_path / "a-file" / "ui.sqlite3")]))

    # --state memory: the old behaviour, sessions in this process only
    memory = build_state(parse([*base, "--state", "memory"]))
    assert memory.store is None
    client = ui_client(memory)
    sid = client.post("/api/session").json()["id"]
    client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0]})
    assert len(client.get(f"/api/s/{sid}").json()["rounds"]) == 1
    restarted = ui_client(build_state(parse([*base, "--state", "memory"])))
    gone = restarted.get(f"/api/s/{sid}")
    assert gone.status_code == 404 and "no longer on the server" in gone.json()["error"]
    monkeypatch.setattr(ui_state, "MAX_SESSIONS", 1)
    client.post("/api/session")
    assert client.get(f"/api/s/{sid}").status_code == 404  # beyond the bound, dropped for good


def test_a_reloaded_page_gets_its_rounds_back_after_a_restart(untrained_pair, browser, page, tmp_path):
    path = tmp_path / "ui.sqlite3"
    first = stored_state(untrained_pair, path)
    ui = start_in_thread(create_app(first), graceful_timeout=5)
    port = int(ui.url.rsplit(":", 1)[1])
    try:
        open_page(page, ui.url)
        submit(page, PROMPTS[0], 1)
        submit(page, PROMPTS[1], 2)
        sid, seed = doc_sid(page), page.input_value("#seed")
        before = page.request.get(ui.url + f"/api/s/{sid}/round/2.png").body()
    finally:
        ui.stop()
    first.store.close()
    ui = start_in_thread(create_app(stored_state(untrained_pair, path)), port=port, graceful_timeout=5)
    try:
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.querySelectorAll('#history .round').length === 2")
        assert doc_sid(page) == sid and page.input_value("#seed") == seed
        assert page.get_attribute("#history .round.head", "data-round") == "2"
        assert page.request.get(ui.url + f"/api/s/{sid}/round/2.png").body() == before
        submit(page, PROMPTS[2], 3)  # and it goes on
    finally:
        ui.stop()


def test_finalize_mode_from_the_api(untrained_pair):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(UIState(untrained_pair, steps=3)))
    sid = client.post("/api/session").json()["id"]
    client.post(f"/api/s/{sid}/generate", json={"prompt": PROMPTS[0]})
    refined = client.post(f"/api/s/{sid}/finalize", json={"mode": "refine"}).json()["final"]
    regenerated = client.post(f"/api/s/{sid}/finalize", json={"mode": "regenerate"}).json()["final"]
    assert refined["strength"] == 0.5 and regenerated["strength"] == 1.0
    assert client.post(f"/api/s/{sid}/finalize", json={"mode": "redo"}).status_code == 422
