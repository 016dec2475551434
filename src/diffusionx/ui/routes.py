"""The web UI's routes: a small FastAPI app around `UIState` (diffusionx.ui.state) and the static
page. Long calls (generate, finalize, load) are plain blocking requests; while one runs the page
polls `/progress`, which reports the U-Net step and, on request, an intermediate preview decoded
from the current prediction of the clean latent (x0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..engine import check_seed, check_steps, check_strength
from ..errors import InvalidInputError
from ..metadata import png_info
from ..policies import FixedStrength
from ..predictors.specs import CHOICES as POLICY_CHOICES
from .state import (
    MAX_LOAD_BYTES,
    MAX_LOAD_STEPS,
    PREVIEW_WAIT_S,
    STATIC,
    BusyError,
    UIState,
    check_prompt,
    final_view,
    generate_round,
    random_seed,
    replay_session,
    round_view,
    session_document,
    state_view,
)

log = logging.getLogger(__name__)


def _png(image: Image.Image, info: PngInfo | None = None, scale: int = 1) -> bytes:
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _png_response(data: bytes, filename: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(data, media_type="image/png", headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ----- the app ------------------------------------------------------------------------------------
def create_app(state: UIState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="DiffusionX", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ui = state

    @app.exception_handler(InvalidInputError)
    async def invalid(request: Request, err: InvalidInputError):
        return _error(422, str(err))

    @app.exception_handler(BusyError)
    async def busy(request: Request, err: BusyError):
        return _error(409, str(err))

    @app.exception_handler(LookupError)
    async def missing(request: Request, err: LookupError):
        return _error(404, str(err))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        log.exception("UI request failed: %s", request.url.path)
        return _error(500, f"the server failed ({type(err).__name__}: {err}); the session is kept")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return _error(404, "no such file")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def config():
        describe = state.pair.describe()
        return {
            "models": describe,
            "edge_label": state.pair.edge_info.label,
            "cloud_label": state.pair.cloud_info.label,
            "cloud": state.cloud_label,
            "steps": state.steps,
            "max_prompt_chars": state.max_prompt_chars,
            "untrained": bool(describe.get("untrained") or describe.get("random_weight")),
            "modes": list(state.modes),
            "policies": list(POLICY_CHOICES),
            "step_previews": state.step_previews,
        }

    @app.post("/api/session")
    def new_session():
        return state_view(state, state.create())

    @app.get("/api/s/{sid}")
    def get_state(sid: str):
        return state_view(state, state.get(sid))

    @app.get("/api/s/{sid}/progress")
    async def progress(sid: str):  # on the event loop: answers even when every worker thread is busy
        return state.get(sid).progress.as_dict()

    @app.get("/api/s/{sid}/progress.png")
    def progress_png(sid: str):
        progress = state.get(sid).progress
        step = progress.x0_step
        if progress.x0 is None:
            return _error(404, "no intermediate preview yet")
        if progress.png is None or progress.png[0] != step:
            # the render thread decodes one at its next U-Net call (a step: tens of ms)
            progress.png_ready.clear()
            progress.png_wanted = True
            progress.png_ready.wait(PREVIEW_WAIT_S)
        if progress.png is None:
            return _error(404, "no intermediate preview yet")
        return _png_response(progress.png[1])

    @app.post("/api/s/{sid}/generate")
    def generate(sid: str, body: dict[str, Any]):
        tab = state.get(sid)
        prompt = check_prompt(body.get("prompt"), state.max_prompt_chars)
        strength = body.get("strength")
        strength = None if strength in (None, "") else check_strength(strength)
        seed = body.get("seed")
        seed = None if seed in (None, "") else check_seed(seed)
        steps = body.get("steps")
        steps = None if steps in (None, "") else check_steps(steps)
        if steps is not None and steps > MAX_LOAD_STEPS:
            raise InvalidInputError(f"at most {MAX_LOAD_STEPS} steps per round here; got {steps}")
        mode = body.get("mode") or None
        if mode is not None and mode not in state.modes:
            choices = ", ".join(state.modes) if state.modes else "none in this version"
            raise InvalidInputError(f"round mode must be one of {choices}; got {mode!r}")
        spec = body.get("policy") or None
        with state.busy(tab, "generate"):
            tab.notes = []
            if spec is not None:
                tab.edge.policy, tab.policy = state.policy_for(spec), spec
            if steps is not None:
                tab.edge.steps = steps  # this round and the next ones
            if seed is not None:
                tab.edge.seed = seed  # the seed field is fixed until changed: later rounds keep it
            r = state.on_render_thread(tab, generate_round, state, tab, prompt, strength, seed, mode)
            state.persist(tab)
        return {**state_view(state, tab), "round": round_view(tab, r)}

    @app.post("/api/s/{sid}/variation")
    def variation(sid: str):
        """The current round again with a new seed: same prompt, same parent and strength."""
        tab = state.get(sid)
        with state.busy(tab, "generate"):
            tab.notes = []
            current = tab.edge.current
            if current is None:
                raise InvalidInputError("nothing to vary yet: generate a preview first")
            if current.parent is not None:
                tab.edge.back(current.parent)
            tab.edge.seed = random_seed()
            strength = current.strength if current.parent else 1.0  # a fresh round stays fresh
            r = state.on_render_thread(tab, generate_round, state, tab, current.prompt, strength, None, None)
            state.persist(tab)
        return {**state_view(state, tab), "round": round_view(tab, r)}

    @app.post("/api/s/{sid}/back")
    def back(sid: str, body: dict[str, Any]):
        tab = state.get(sid)
        index = body.get("round")
        with state.busy(tab, "generate"):
            tab.notes = []
            tab.edge.back(index)
            state.persist(tab)
        return state_view(state, tab)

    @app.post("/api/s/{sid}/finalize")
    def finalize(sid: str, body: dict[str, Any] | None = None):
        tab = state.get(sid)
        body = body or {}
        strength = body.get("strength")
        strength = None if strength in (None, "") else check_strength(strength)
        spec = body.get("policy") or None
        mode = body.get("mode") or "refine"
        with state.busy(tab, "finalize"):
            tab.notes = []
            if spec is not None:
                tab.edge.policy, tab.policy = state.policy_for(spec), spec
            if tab.edge.current is None:
                raise InvalidInputError("nothing to finalize yet: generate a preview first")
            load = None
            if hasattr(state.cloud, "load") and not isinstance(tab.edge.policy, FixedStrength):
                try:
                    load = state.cloud.load()  # for a load-aware policy; unreachable -> None
                except Exception:
                    load = None
            start = time.perf_counter()

            if state.cloud is None:  # the in-process cloud model shares this machine: take turns
                def run_final():
                    with state.render(tab, state.pair.cloud, "finalizing"):
                        return tab.edge.finalize(strength=strength, load=load, mode=mode)

                final = state.on_render_thread(tab, run_final)
            else:  # the cloud renders elsewhere: only the edge's decodes take the render thread
                tab.progress.phase = "finalizing"
                final = tab.edge.finalize(strength=strength, load=load, mode=mode,
                                          on_edge=functools.partial(state.on_render_thread, tab))
            tab.final_info = final_view(tab, final, time.perf_counter() - start)
            state.persist(tab)
        return state_view(state, tab)

    @app.get("/api/s/{sid}/round/{index}.png")
    def round_png(sid: str, index: int, download: int = 0):
        tab = state.get(sid)
        r = tab.edge.round(index)
        if not download:
            return _png_response(_png(r.image))
        info = png_info(r.image, prompt=r.prompt, steps=r.steps, seed=r.seed, model=state.pair.edge_info.source,
                        strength=None if r.mode == "fresh" else r.strength, guidance=tab.edge.guidance_scale,
                        report={"models": state.pair.describe(), "round": r.summary()})
        return _png_response(_png(r.image, info), f"diffusionx-round-{index:02d}.png")

    @app.get("/api/s/{sid}/final.png")
    def final_png(sid: str, download: int = 0):
        tab = state.get(sid)
        final = tab.edge.final
        if final is None:
            return _error(404, "no final image yet: press Finalize")
        source = tab.edge.round(final.source_round)
        info = png_info(final.image, prompt=final.prompt, steps=final.steps or source.steps, seed=source.seed,
                        model=(state.pair.cloud_info if final.refined else state.pair.edge_info).source,
                        strength=final.strength if final.refined else None, guidance=tab.edge.guidance_scale,
                        report={"models": state.pair.describe(), "final": final.summary()})
        name = "diffusionx-final.png" if final.refined else "diffusionx-final-preview-not-refined.png"
        return _png_response(_png(final.image, info), name if download else None)

    @app.get("/api/s/{sid}/session.json")
    def session_json(sid: str):
        tab = state.get(sid)
        body = json.dumps(session_document(state, tab), indent=2)
        headers = {"Content-Disposition": 'attachment; filename="diffusionx-session.json"', "Cache-Control": "no-store"}
        return Response(body, media_type="application/json", headers=headers)

    @app.post("/api/s/{sid}/load")
    async def load(sid: str, request: Request):
        tab = state.get(sid)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_LOAD_BYTES:
            raise InvalidInputError(f"the session file is {declared} bytes; the limit is {MAX_LOAD_BYTES}")
        raw = await request.body()
        if len(raw) > MAX_LOAD_BYTES:
            raise InvalidInputError(f"the session file is {len(raw)} bytes; the limit is {MAX_LOAD_BYTES}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"the session file is not valid JSON ({err})") from None
        from starlette.concurrency import run_in_threadpool

        def replay():
            with state.busy(tab, "load"):
                tab.notes = state.on_render_thread(tab, replay_session, state, tab, doc)
                state.persist(tab)
            return state_view(state, tab)

        return await run_in_threadpool(replay)

    return app


