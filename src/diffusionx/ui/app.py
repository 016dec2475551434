"""The web UI's server: a small FastAPI app around per-tab `EdgeSession`s, and a static page.

Every browser tab asks for its own session id (kept in the tab's sessionStorage) and sends it with
each call, so tabs are independent sessions. The models are shared: one render runs at a time
(`model_lock`); a tab whose render waits says so in its progress line. Long calls (generate,
finalize, load) are plain blocking requests; while one runs the page polls `/progress`, which
reports the U-Net step and, on request, an intermediate preview decoded from the current
prediction of the clean latent (x0).

Sessions are kept in a store (`diffusionx.ui.store`: a SQLite file by default) after each
successful round, branch, finalize and load, so a restart of the server keeps every tab's rounds;
`sessions` holds the most recently used ones in memory and the others are read back, by id, when
their tab asks for them. Without a store (`--state memory`) a session lives only in memory.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..cloud import Refiner
from ..engine import DEFAULT_SCHEDULER, Engine, check_seed, check_steps, check_strength, make_scheduler
from ..errors import DiffusionXError, InvalidInputError, PromptTruncatedWarning
from ..metadata import png_info
from ..models import ModelPair
from ..policies import FixedStrength, StrengthPolicy
from ..predictors.specs import CHOICES as POLICY_CHOICES
from ..session import EdgeSession, FinalResult, Round
from .store import (
    KEEP_FINAL,
    STORE_FORMAT,
    SQLiteSessionStore,
    StoredSession,
    StoredSessionError,
    final_from_record,
    final_record,
    round_from_record,
    round_record,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
SESSION_FORMAT = "diffusionx-ui-session/1"
MAX_PROMPT_CHARS = 1000  # the cloud service's default limit, so a prompt the page takes can be refined
MAX_ROUNDS = 200  # per session, and per loaded session file
MAX_SESSIONS = 64  # tabs kept in memory; beyond this the least recently used one is dropped from memory
# (with a store it stays on disk and is read back when its tab asks; without one it is gone)
EVICT_EVERY_S = 3600.0  # how often stored sessions past their age limit are looked for
GONE = "this session is no longer on the server (it restarted or the tab was idle)"
MAX_LOAD_BYTES = 2 * 1024 * 1024
MAX_LOAD_STEPS = 200
PREVIEW_MAX_LATENT = 32 * 32  # step previews (a VAE decode each) only for latents up to this many pixels


def round_modes() -> tuple[str, ...]:
    """The round modes EdgeSession.generate takes (fresh / sdedit / controlled / auto), or none
    when this version of the session has no `mode` argument."""
    from .. import session

    if "mode" not in inspect.signature(EdgeSession.generate).parameters:
        return ()
    return tuple(getattr(session, "ROUND_MODES", ("fresh", "sdedit", "controlled")))


def random_seed() -> int:
    return secrets.randbelow(2**31)


class BusyError(DiffusionXError):
    """The session is already rendering or finalizing."""


@dataclass
class Progress:
    phase: str = "idle"  # idle | waiting | rendering | finalizing | replaying
    step: int = 0
    total: int = 0
    note: str = ""
    x0: torch.Tensor | None = None  # latest predicted clean latent (for the intermediate preview)
    x0_step: int = 0  # U-Net calls so far in this busy spell (only grows), when x0 was taken
    calls: int = 0
    started: float = 0.0
    png: tuple[int, bytes] | None = None  # the last decoded intermediate preview (step, PNG)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "note": self.note,
            "preview_step": self.x0_step if self.x0 is not None else 0,
            "elapsed_s": time.perf_counter() - self.started if self.phase != "idle" else 0.0,
        }


@dataclass
class TabSession:
    id: str
    edge: EdgeSession
    epoch: int = 0  # bumped when a load replaces the rounds, so image URLs change
    busy: str | None = None  # "generate" | "finalize" | "load"
    progress: Progress = field(default_factory=Progress)
    final_info: dict[str, Any] | None = None  # the final result's summary plus what the page shows
    notes: list[str] = field(default_factory=list)  # warnings of the last load
    policy: str = "fixed"  # the strength policy's spec (diffusionx.predictors.specs)
    lock: threading.Lock = field(default_factory=threading.Lock)
    saved: tuple[int, int] = (-1, 0)  # (epoch, rounds) already in the store
    saved_final: FinalResult | None = None  # the final already in the store


class UIState:
    def __init__(
        self,
        pair: ModelPair,
        *,
        cloud: Refiner | None = None,
        cloud_label: str = "in-process",
        policy: StrengthPolicy | None = None,
        steps: int = 20,
        seed: int | None = None,
        guidance_scale: float = 7.5,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        threads: int = 0,
        step_previews: bool | None = None,
        store: SQLiteSessionStore | None = None,
    ):
        self.pair = pair
        self.store = store  # None: sessions live in this process only
        self._evicted_at = float("-inf")
        self.cloud = cloud
        self.cloud_label = cloud_label
        self.policy = policy or FixedStrength()
        self._policies: dict[str, StrengthPolicy] = {}  # built once per spec (a learned one loads models)
        self.steps = check_steps(steps)
        self.seed = None if seed is None else check_seed(seed)  # None: a random seed per session
        self.guidance_scale = guidance_scale
        self.max_prompt_chars = max_prompt_chars
        self.threads = threads or torch.get_num_threads()
        self.sessions: OrderedDict[str, TabSession] = OrderedDict()
        self.sessions_lock = threading.Lock()
        self.model_lock = threading.Lock()  # one render (edge or in-process cloud) at a time
        self.modes = round_modes()
        if step_previews is None:  # cheap enough only for small latents (the embedded pair: 16x16)
            height, width = pair.edge.latent_shape()[-2:]
            step_previews = height * width <= PREVIEW_MAX_LATENT
        self.step_previews = step_previews
        self.preview_lock = threading.Lock()  # one intermediate decode at a time; others get the last one
        self._alphas = make_scheduler(DEFAULT_SCHEDULER, pair.edge.scheduler_config).alphas_cumprod
        self.evict_stored()

    # ----- sessions ---------------------------------------------------------------------------
    def new_edge_session(self, steps: int | None = None, seed: int | None = None) -> EdgeSession:
        if seed is None:
            seed = random_seed() if self.seed is None else self.seed
        return EdgeSession(
            self.pair,
            policy=self.policy,
            cloud=self.cloud,
            steps=self.steps if steps is None else steps,
            seed=seed,
            guidance_scale=self.guidance_scale,
        )

    def policy_for(self, spec: str) -> StrengthPolicy:
        """The policy a spec names (diffusionx.predictors.specs); "fixed" is the UI's own strengths."""
        from ..predictors.specs import policy_from_spec

        if spec not in self._policies:
            base = self.policy if isinstance(self.policy, FixedStrength) else FixedStrength()
            try:
                self._policies[spec] = policy_from_spec(spec, edge_strength=base.edge, cloud_strength=base.cloud)
            except ValueError as err:
                raise InvalidInputError(str(err)) from None
        return self._policies[spec]

    def create(self) -> TabSession:
        tab = TabSession(secrets.token_urlsafe(12), self.new_edge_session())
        with self.sessions_lock:
            self.sessions[tab.id] = tab
            self._trim()
        self.persist(tab)
        if time.monotonic() - self._evicted_at > EVICT_EVERY_S:
            self.evict_stored()
        return tab

    def _trim(self) -> None:
        """Keep at most MAX_SESSIONS in memory (callers hold sessions_lock); a busy one stays."""
        while len(self.sessions) > MAX_SESSIONS:
            oldest = next(iter(self.sessions))
            if self.sessions[oldest].busy:
                break
            del self.sessions[oldest]

    def get(self, sid: str) -> TabSession:
        with self.sessions_lock:
            tab = self.sessions.get(sid)
            if tab is not None:
                self.sessions.move_to_end(sid)
                return tab
            tab = self._restore(sid)  # under the lock: two calls for one id get one TabSession
            self.sessions[sid] = tab
            self._trim()
            return tab

    # ----- the store --------------------------------------------------------------------------
    def persist(self, tab: TabSession) -> None:
        """Write what changed in `tab` since its last write: one transaction (its settings, head
        and final, and its new rounds; all of them after a load replaced them). A failed write is
        logged and said on the page; the session itself is kept in memory."""
        if self.store is None:
            return
        edge = tab.edge
        epoch, count = tab.saved
        replace = epoch != tab.epoch
        try:
            rounds = [round_record(r) for r in edge.rounds[0 if replace else count :]]
            if edge.final is not None and edge.final is tab.saved_final and not replace:
                final = KEEP_FINAL
            else:
                final = None if edge.final is None else final_record(edge.final, tab.final_info)
            self.store.save(tab.id, self._settings(tab), rounds, final=final, replace_rounds=replace)
        except Exception as err:
            log.exception("could not store UI session %s", tab.id)
            tab.notes = [*tab.notes, f"this session could not be saved ({type(err).__name__}: {err}); "
                         "a restart of the server would lose its latest changes"]
            return
        tab.saved, tab.saved_final = (tab.epoch, len(edge.rounds)), edge.final

    def _settings(self, tab: TabSession) -> dict[str, Any]:
        edge = tab.edge
        return {
            "format": STORE_FORMAT,
            "models": self.pair.describe(),
            "epoch": tab.epoch,
            "steps": edge.steps,
            "cloud_steps": edge.cloud_steps,
            "seed": edge.seed,
            "guidance_scale": edge.guidance_scale,
            "scheduler": edge.scheduler,
            "head": edge.head,
            "policy": tab.policy,
            "policy_chosen": edge.policy is not self.policy,  # else the server's own (--edge-strength ...)
        }

    def _restore(self, sid: str) -> TabSession:
        if self.store is None:
            raise LookupError(GONE)
        try:
            record = self.store.load(sid)
            if record is None:
                raise LookupError(GONE)
            return self._tab_from(record)
        except LookupError:
            raise
        except Exception as err:
            log.warning("stored UI session %s cannot be restored: %s: %s", sid, type(err).__name__, err)
            raise StoredSessionError(
                f"this session is no longer on the server: its stored copy ({self.store.describe()}) "
                f"could not be restored ({type(err).__name__}: {err})"
            ) from None

    def _tab_from(self, record: StoredSession) -> TabSession:
        s = record.settings
        if not isinstance(s, dict) or s.get("format") != STORE_FORMAT:
            found = s.get("format") if isinstance(s, dict) else type(s).__name__
            raise ValueError(f"its format is {found!r}, not {STORE_FORMAT!r}")
        edge = self.new_edge_session(steps=check_steps(s["steps"]), seed=check_seed(s["seed"]))
        edge.cloud_steps = check_steps(s.get("cloud_steps", edge.steps))
        edge.guidance_scale, edge.scheduler = float(s["guidance_scale"]), str(s["scheduler"])
        rounds = [round_from_record(r) for r in record.rounds]
        expected = tuple(self.pair.edge.latent_shape())[-3:]
        saved_pair = (s.get("models") or {}).get("pair")
        for r in rounds:
            if tuple(r.latents.shape)[-3:] != expected:
                raise ValueError(f"round {r.index}'s latents have shape {tuple(r.latents.shape)}; this server's "
                                 f"edge model ({self.pair.describe().get('pair')}) needs {expected} "
                                 f"(saved with {saved_pair!r})")
        final, view = final_from_record(record.final) if record.final is not None else (None, None)
        edge.restore(rounds, s.get("head"), final)
        tab = TabSession(record.id, edge, epoch=int(s.get("epoch", 0)), final_info=view,
                         policy=str(s.get("policy", "fixed")))
        if saved_pair not in (None, self.pair.describe().get("pair")):
            tab.notes.append(f"saved with model pair {saved_pair!r}; this server runs {self.pair.describe()['pair']!r}")
        if s.get("policy_chosen"):
            try:
                edge.policy = self.policy_for(tab.policy)
            except InvalidInputError as err:
                tab.notes.append(f"this session's policy {tab.policy!r} cannot be built here ({err}); "
                                 "the fixed strengths are used")
                tab.policy = "fixed"
        tab.saved, tab.saved_final = (tab.epoch, len(rounds)), final
        return tab

    def evict_stored(self) -> int:
        """Delete stored sessions past the store's age limit (not those in memory here)."""
        self._evicted_at = time.monotonic()
        if self.store is None:
            return 0
        with self.sessions_lock:
            keep = set(self.sessions)
        try:
            return self.store.evict(keep)
        except Exception:
            log.exception("could not evict old UI sessions from %s", self.store.describe())
            return 0

    @contextmanager
    def busy(self, tab: TabSession, what: str):
        with tab.lock:
            if tab.busy == "finalize" and what == "finalize":
                raise BusyError("a Finalize is already running for this session; wait for its result")
            if tab.busy:
                raise BusyError(f"this session is busy ({_BUSY_WORDS[tab.busy]}); wait until it is done")
            tab.busy = what
            tab.progress = Progress(phase="waiting", started=time.perf_counter())
        try:
            yield
        finally:
            with tab.lock:
                tab.busy = None
                tab.progress = Progress()

    @contextmanager
    def render(self, tab: TabSession, engine: Engine | None, phase: str):
        """Hold the model lock; while held, count `engine`'s U-Net calls into the tab's progress
        and keep the predicted clean latent of the newest one."""
        if self.model_lock.locked():
            tab.progress.note = "waiting for another tab's render to finish"
        with self.model_lock:
            torch.set_num_threads(self.threads)  # worker threads do not inherit the main thread's setting
            progress = tab.progress
            progress.phase, progress.note, progress.step, progress.x0 = phase, "", 0, None
            if engine is None:
                yield progress
                return
            original_start = engine.start

            def start(*args, **kwargs):
                job = original_start(*args, **kwargs)
                progress.total, progress.step = job.num_steps, 0
                return job

            handle = engine.unet.register_forward_hook(self._hook(progress, self.step_previews), with_kwargs=True)
            engine.start = start  # type: ignore[method-assign]
            try:
                yield progress
            finally:
                handle.remove()
                del engine.start

    def _hook(self, progress: Progress, previews: bool):
        alphas = self._alphas

        def hook(module, args, kwargs, output) -> None:
            progress.step += 1
            progress.calls += 1
            if not previews:
                return
            try:
                sample, t = args[0], args[1]
                eps = output[0] if isinstance(output, tuple) else output.sample
                n = sample.shape[0]
                if n >= 2 and n % 2 == 0 and self.guidance_scale > 1.0:  # [uncond..., cond...]
                    uncond, cond = eps.chunk(2)
                    eps, sample = uncond + self.guidance_scale * (cond - uncond), sample[n // 2 :]
                a = alphas[int(t.flatten()[0])].to(sample.dtype)
                x0 = (sample[-1:] - (1 - a).sqrt() * eps[-1:]) / a.sqrt()
                progress.x0, progress.x0_step = x0.detach().clone(), progress.calls
            except Exception:  # a preview is a nicety; never break a render for it
                progress.x0 = None

        return hook


_BUSY_WORDS = {"generate": "rendering a round", "finalize": "finalizing", "load": "loading a session"}


# ----- JSON views ---------------------------------------------------------------------------------
def _describe_round(r: Round) -> str:
    if r.mode == "fresh":
        return "fresh, from noise"
    source = f"from round {r.parent}" if r.parent else "from the previous latent"
    if r.mode == "sdedit":
        return f"{source} at strength {r.strength:.2f} (SDEdit)"
    if r.mode == "controlled":
        return f"attention-controlled, {source} at strength {r.strength:.2f}"
    return f"{r.mode}, {source} at strength {r.strength:.2f}"


def _round_view(tab: TabSession, r: Round) -> dict[str, Any]:
    return {
        **r.summary(),
        "how": _describe_round(r),
        "image": f"/api/s/{tab.id}/round/{r.index}.png?v={tab.epoch}",
    }


def _final_view(tab: TabSession, final: FinalResult, wall_s: float) -> dict[str, Any]:
    edge = tab.edge
    source = edge.round(final.source_round)
    cloud_compute = final.cloud_timing.total_s
    queue = max(0.0, final.cloud_seconds - cloud_compute)
    transfer = max(0.0, wall_s - final.cloud_seconds - final.edge_decode_s) if final.refined else 0.0
    return {
        **final.summary(),
        "edge_seconds": sum(r.timing.total_s for r in edge.rounds),
        "source_edge_seconds": source.timing.total_s,
        "cloud_queue_s": queue,
        "cloud_compute_s": cloud_compute,
        "transfer_s": transfer,
        "finalize_wall_s": wall_s,
        "preview_image": f"/api/s/{tab.id}/round/{final.source_round}.png?v={tab.epoch}",
        "image": f"/api/s/{tab.id}/final.png?v={tab.epoch}-{time.monotonic_ns()}",
    }


def _state(state: UIState, tab: TabSession) -> dict[str, Any]:
    edge = tab.edge
    return {
        "id": tab.id,
        "epoch": tab.epoch,
        "steps": edge.steps,
        "seed": edge.seed,
        "head": edge.head,
        "rounds": [_round_view(tab, r) for r in edge.rounds],
        "final": tab.final_info,
        "busy": tab.busy,
        "notes": tab.notes,
        "policy": tab.policy,
    }


def session_document(state: UIState, tab: TabSession) -> dict[str, Any]:
    """What the page downloads: enough to replay the session (prompts, seeds, strengths, parents)
    plus every timing. Latents are not included: replaying regenerates them exactly."""
    edge = tab.edge
    return {
        "format": SESSION_FORMAT,
        "models": state.pair.describe(),
        "steps": edge.steps,
        "guidance_scale": edge.guidance_scale,
        "scheduler": edge.scheduler,
        "seed": edge.seed,
        "head": edge.head,
        "rounds": edge.history(),
        "final": tab.final_info and {k: v for k, v in tab.final_info.items() if k not in ("image", "preview_image")},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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


def check_prompt(prompt: Any, limit: int) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError("the prompt is empty: type what the image should show")
    prompt = prompt.strip()
    if len(prompt) > limit:
        raise InvalidInputError(f"the prompt is {len(prompt)} characters; the limit is {limit}. Shorten it.")
    return prompt


# ----- the rounds ---------------------------------------------------------------------------------
def _generate(
    state: UIState, tab: TabSession, prompt: str, strength: float | None, seed: int | None, mode: str | None
) -> Round:
    extra = {} if mode is None else {"mode": mode}
    with state.render(tab, state.pair.edge, "rendering"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        r = tab.edge.generate(prompt, strength=strength, seed=seed, **extra)
    cut = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    notes = []
    if cut:
        notes.append(cut[0])
    elif r.prompt_truncated:  # the engine warns once per prompt; say it every time
        notes.append("the prompt is longer than the text encoder reads; its end was cut and ignored")
    if r.unknown_words:  # every round that has them, not only the first
        notes.append(
            f"the embedded models do not know: {', '.join(r.unknown_words)}; the image will not follow those "
            "words (`diffusionx vocab` lists the ones they know)"
        )
    if notes:
        tab.notes = notes
    return r


def _replay(state: UIState, tab: TabSession, doc: Any) -> list[str]:
    """Rebuild a saved session by regenerating each round from its saved prompt, seed, strength
    and parent, in order. The result is a fresh EdgeSession that replaces the tab's one."""
    if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
        raise InvalidInputError(f"not a DiffusionX session file (expected format {SESSION_FORMAT!r})")
    rounds = doc.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise InvalidInputError("the session file has no rounds")
    if len(rounds) > MAX_ROUNDS:
        raise InvalidInputError(f"the session file has {len(rounds)} rounds; at most {MAX_ROUNDS} can be loaded")
    steps = check_steps(doc.get("steps", state.steps))
    if steps > MAX_LOAD_STEPS:
        raise InvalidInputError(f"the session uses {steps} steps; at most {MAX_LOAD_STEPS} can be replayed here")
    saved_seed = doc.get("seed")
    edge = state.new_edge_session(steps=steps, seed=None if saved_seed is None else check_seed(saved_seed))
    plan = []
    for i, r in enumerate(rounds, start=1):
        if not isinstance(r, dict):
            raise InvalidInputError(f"round {i} of the session file is not an object")
        prompt = check_prompt(r.get("prompt"), state.max_prompt_chars)
        seed = check_seed(r.get("seed", edge.seed))
        strength = check_strength(r.get("strength", 1.0))
        parent = r.get("parent")
        if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or not 1 <= parent < i):
            raise InvalidInputError(f"round {i} names parent {parent!r}, which is not an earlier round")
        if i == 1 or parent is None:
            strength = 1.0  # no latent to start from: a fresh round, as it was made
        plan.append((prompt, seed, strength, parent, r.get("mode")))
    notes = []
    models = doc.get("models", {})
    if isinstance(models, dict) and models.get("pair") not in (None, state.pair.describe().get("pair")):
        notes.append(f"saved with model pair {models.get('pair')!r}, replayed with {state.pair.describe()['pair']!r}")
    with state.render(tab, state.pair.edge, "replaying") as progress:
        for i, (prompt, seed, strength, parent, mode) in enumerate(plan, start=1):
            progress.note = f"replaying round {i} of {len(plan)}"
            if parent is not None:
                edge.back(parent)
            if mode == "controlled" and "controlled" in state.modes and parent is not None:
                edge.generate(prompt, mode="controlled")  # re-walks the parent's trajectory (its seed, strength)
                continue
            edge.generate(prompt, strength=strength, seed=seed)
            if mode == "controlled":
                notes.append(f"round {i} was attention-controlled; it was replayed as SDEdit at the same strength")
    head = doc.get("head")
    if isinstance(head, int) and not isinstance(head, bool) and 1 <= head <= len(edge.rounds):
        edge.back(head)
    tab.edge = edge
    tab.epoch += 1
    tab.final_info = None
    return notes


# ----- the app ------------------------------------------------------------------------------------
def create_app(state: UIState) -> FastAPI:
    app = FastAPI(title="DiffusionX", docs_url=None, redoc_url=None, openapi_url=None)
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
        return _state(state, state.create())

    @app.get("/api/s/{sid}")
    def get_state(sid: str):
        return _state(state, state.get(sid))

    @app.get("/api/s/{sid}/progress")
    async def progress(sid: str):  # on the event loop: answers even when every worker thread is busy
        return state.get(sid).progress.as_dict()

    @app.get("/api/s/{sid}/progress.png")
    def progress_png(sid: str):
        progress = state.get(sid).progress
        x0, step = progress.x0, progress.x0_step
        if x0 is None:
            return _error(404, "no intermediate preview yet")
        if progress.png is not None and progress.png[0] == step:
            return _png_response(progress.png[1])
        if not state.preview_lock.acquire(blocking=False):  # a decode is running: the last one will do
            if progress.png is None:
                return _error(404, "no intermediate preview yet")
            return _png_response(progress.png[1])
        try:
            engine = state.pair.edge
            image = engine.decode(x0.to(engine.device, engine.dtype))[0]  # small; runs beside the render
            progress.png = (step, _png(image))
        finally:
            state.preview_lock.release()
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
            r = _generate(state, tab, prompt, strength, seed, mode)
            state.persist(tab)
        return {**_state(state, tab), "round": _round_view(tab, r)}

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
            r = _generate(state, tab, current.prompt, strength, None, None)
            state.persist(tab)
        return {**_state(state, tab), "round": _round_view(tab, r)}

    @app.post("/api/s/{sid}/back")
    def back(sid: str, body: dict[str, Any]):
        tab = state.get(sid)
        index = body.get("round")
        with state.busy(tab, "generate"):
            tab.notes = []
            tab.edge.back(index)
            state.persist(tab)
        return _state(state, tab)

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
                with state.render(tab, state.pair.cloud, "finalizing"):
                    final = tab.edge.finalize(strength=strength, load=load, mode=mode)
            else:  # the cloud renders elsewhere; the edge only decodes
                tab.progress.phase = "finalizing"
                final = tab.edge.finalize(strength=strength, load=load, mode=mode)
            tab.final_info = _final_view(tab, final, time.perf_counter() - start)
            state.persist(tab)
        return _state(state, tab)

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
                tab.notes = _replay(state, tab, doc)
                state.persist(tab)
            return _state(state, tab)

        return await run_in_threadpool(replay)

    return app


# ----- `diffusionx ui` ----------------------------------------------------------------------------
def build_state(args) -> UIState:
    import sys

    from ..models import load_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair(args.model, edge=args.edge, cloud=args.cloud)
    print(f"models: edge {pair.edge_info.label}, cloud {pair.cloud_info.label}", file=sys.stderr)
    cloud, label = None, "in-process"
    if args.cloud_url:
        from ..client import CloudClient

        token = args.token or os.environ.get("DIFFUSIONX_TOKEN")
        cloud = CloudClient(args.cloud_url, token, retries=2, backoff=0.25, connect_timeout=3.0)
        label = args.cloud_url
    policy = FixedStrength(edge=check_strength(args.edge_strength), cloud=check_strength(args.cloud_strength))
    store = open_ui_store(getattr(args, "state", None), getattr(args, "session_max_age", None))
    return UIState(pair, cloud=cloud, cloud_label=label, policy=policy, steps=args.steps, seed=args.seed, store=store)


def ui_store_location(state: str | None) -> str:
    """`--state`: as given, else ui-sessions.sqlite3 in the state directory `diffusionx serve` uses."""
    from ..server.config import default_state_dir
    from .store import STORE_FILE_NAME

    return state or str(default_state_dir() / STORE_FILE_NAME)


def open_ui_store(state: str | None, max_age_days: float | None = None) -> SQLiteSessionStore | None:
    """The session store `diffusionx ui` opens (None for `--state memory`), checked at start: a file
    that cannot be opened is bad input (exit 2); says where the sessions are on stderr."""
    import sys

    from .store import DEFAULT_MAX_AGE_S, open_session_store

    location = ui_store_location(state)
    days = DEFAULT_MAX_AGE_S / 86400 if max_age_days is None else max_age_days
    if not (isinstance(days, (int, float)) and math.isfinite(days) and days > 0):
        raise InvalidInputError(f"--session-max-age must be a positive number of days, got {days!r}")
    try:
        store = open_session_store(location, max_age_s=days * 86400)
    except Exception as err:
        raise InvalidInputError(f"cannot open the UI's session store {location}: {err}") from None
    if store is None:
        print("sessions: memory (this process only; a restart forgets them)", file=sys.stderr)
    else:
        print(f"sessions: {store.describe()} (each kept {days:g} days after its last change)", file=sys.stderr)
    return store


def run_ui(args) -> int:
    import uvicorn

    state = build_state(args)
    if not math.isfinite(args.port) or not 0 <= args.port <= 65535:
        raise InvalidInputError(f"port must be in 0-65535, got {args.port}")
    print(f"DiffusionX UI on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    return 0
