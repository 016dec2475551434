"""The web UI's state: per-tab `EdgeSession`s (`UIState`, `TabSession`), their progress, what the
page is shown of them (JSON views), and the operations on them (a round, a replay of a saved
session). Routes: `diffusionx.ui.routes`; the command: `diffusionx.ui.app`.

Every browser tab asks for its own session id (kept in the tab's sessionStorage) and sends it with
each call, so tabs are independent sessions. The models are shared: every render runs on one
render thread (`on_render_thread`), so one at a time; a tab whose render waits says so in its
progress line.

Sessions are kept in a store (`diffusionx.ui.store`: a SQLite file by default) after each
successful round, branch, finalize and load, so a restart of the server keeps every tab's rounds;
`sessions` holds the most recently used ones in memory and the others are read back, by id, when
their tab asks for them. Without a store (`--state memory`) a session lives only in memory.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..cloud import Refiner
from ..engine import DEFAULT_SCHEDULER, Engine, check_seed, check_steps, check_strength
from ..errors import DiffusionXError, InvalidInputError, PromptTruncatedWarning
from ..models import ModelPair
from ..policies import FixedStrength, StrengthPolicy
from ..session import EdgeSession, FinalResult, Round
from ..wire import image_to_png
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
T = TypeVar("T")

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
PREVIEW_WAIT_S = 0.5  # how long a request for a newer intermediate preview waits for the render thread
PREVIEW_MAX_LATENT = 32 * 32  # step previews (a decode each) only for latents up to this many pixels


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
    # a client asked for a newer intermediate preview: the render thread decodes one at its next
    # U-Net call and sets `png_ready` (decoding on the asking thread would start a second OpenMP team)
    png_wanted: bool = False
    png_ready: threading.Event = field(default_factory=threading.Event, repr=False)

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
        policy: FixedStrength | None = None,
        default_policy: str = "fixed",
        steps: int | None = None,
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
        self.policy = policy or FixedStrength()  # the strengths of the "fixed" spec
        self._policies: dict[str, StrengthPolicy] = {}  # built once per spec (a learned one loads models)
        self.default_policy = default_policy  # a new tab's spec
        if default_policy != "fixed":
            self.policy_for(default_policy)  # a bad spec fails at start; the first tab does not wait for models
        self.steps = check_steps(pair.steps_or_default(steps))
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
        # Every torch op of the UI runs on this one thread: each thread that runs torch ops keeps an
        # OpenMP team of its own, and with more OpenMP threads than cores libgomp stops spinning
        # between ops (docs/serving.md): a round took 2.9x as long with a second team alive.
        self._render_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusionx-render")
        self._render_queue_lock = threading.Lock()
        self._renders_queued = 0  # submitted to the render thread and not yet done
        self._alphas = pair.edge.new_scheduler(DEFAULT_SCHEDULER).alphas_cumprod
        self.evict_stored()

    def close(self) -> None:
        """Stop the render thread once the renders queued on it are done (the app's shutdown)."""
        self._render_thread.shutdown(wait=True)

    # ----- sessions ---------------------------------------------------------------------------
    def new_edge_session(self, steps: int | None = None, seed: int | None = None,
                         policy: str | None = None) -> EdgeSession:
        """A session under the policy spec `policy` (default: a new tab's)."""
        if seed is None:
            seed = random_seed() if self.seed is None else self.seed
        return EdgeSession(
            self.pair,
            policy=self.policy_for(policy or self.default_policy),
            cloud=self.cloud,
            steps=self.steps if steps is None else steps,
            seed=seed,
            guidance_scale=self.guidance_scale,
        )

    def on_render_thread(self, tab: TabSession, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` for `tab` on the render thread, after the renders queued before it
        (the tab's progress line says it waits); its exception is re-raised here."""
        if threading.current_thread().name.startswith("diffusionx-render"):
            return fn(*args, **kwargs)
        with self._render_queue_lock:
            if self._renders_queued:
                tab.progress.note = "waiting for another tab's render to finish"
            self._renders_queued += 1
        try:
            return self._render_thread.submit(fn, *args, **kwargs).result()
        finally:
            with self._render_queue_lock:
                self._renders_queued -= 1

    def policy_for(self, spec: str) -> StrengthPolicy:
        """The policy a spec names (diffusionx.predictors.specs); "fixed" is the UI's own strengths."""
        from ..predictors.specs import policy_from_spec

        if spec == "fixed":
            return self.policy
        if spec not in self._policies:
            try:
                self._policies[spec] = policy_from_spec(spec, edge_strength=self.policy.edge,
                                                        cloud_strength=self.policy.cloud)
            except ValueError as err:
                raise InvalidInputError(str(err)) from None
        return self._policies[spec]

    def create(self) -> TabSession:
        tab = TabSession(secrets.token_urlsafe(12), self.new_edge_session(), policy=self.default_policy)
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
        edge = self.new_edge_session(steps=check_steps(s["steps"]), seed=check_seed(s["seed"]), policy="fixed")
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
        if s.get("policy_chosen"):  # else the server's fixed strengths
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
        with self.model_lock:  # renders called off the render thread (tests, scripts) take turns too
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
                progress.png_ready.set()  # nothing more will be decoded: nobody waits for it

    def preview_png(self, x0: torch.Tensor) -> bytes:
        """An intermediate latent as a PNG, by the edge's preview decoder where it has one, else its
        VAE (small latents only: `step_previews`)."""
        engine = self.pair.edge
        return image_to_png(engine.decode(x0.to(engine.device, engine.dtype), preview=True)[0])

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
                if progress.png_wanted:
                    progress.png_wanted = False
                    progress.png = (progress.x0_step, self.preview_png(progress.x0))
                    progress.png_ready.set()
            except Exception:  # a preview is a nicety; never break a render for it
                progress.x0 = None

        return hook


_BUSY_WORDS = {"generate": "rendering a round", "finalize": "finalizing", "load": "loading a session"}


# ----- JSON views ---------------------------------------------------------------------------------
def describe_round(r: Round) -> str:
    if r.mode == "fresh":
        return "fresh, from noise"
    source = f"from round {r.parent}" if r.parent else "from the previous latent"
    if r.mode == "sdedit":
        return f"{source} at strength {r.strength:.2f} (SDEdit)"
    if r.mode == "controlled":
        return f"attention-controlled, {source} at strength {r.strength:.2f}"
    if r.mode == "local":
        return f"local edit {source}: regenerated where the edit lands (strength {r.strength:.2f}), the rest kept"
    return f"{r.mode}, {source} at strength {r.strength:.2f}"


def round_view(tab: TabSession, r: Round) -> dict[str, Any]:
    return {
        **r.summary(),
        "how": describe_round(r),
        "image": f"/api/s/{tab.id}/round/{r.index}.png?v={tab.epoch}",
    }


def final_view(tab: TabSession, final: FinalResult, wall_s: float) -> dict[str, Any]:
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


def state_view(state: UIState, tab: TabSession) -> dict[str, Any]:
    edge = tab.edge
    return {
        "id": tab.id,
        "epoch": tab.epoch,
        "steps": edge.steps,
        "seed": edge.seed,
        "head": edge.head,
        "rounds": [round_view(tab, r) for r in edge.rounds],
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


def check_prompt(prompt: Any, limit: int) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError("the prompt is empty: type what the image should show")
    prompt = prompt.strip()
    if len(prompt) > limit:
        raise InvalidInputError(f"the prompt is {len(prompt)} characters; the limit is {limit}. Shorten it.")
    return prompt


# ----- the rounds ---------------------------------------------------------------------------------
def generate_round(
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


def replay_session(state: UIState, tab: TabSession, doc: Any) -> list[str]:
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
    edge = state.new_edge_session(steps=steps, seed=None if saved_seed is None else check_seed(saved_seed),
                                  policy=tab.policy)
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
            if mode == "local" and "local" in state.modes and parent is not None:
                edge.generate(prompt, mode="local", seed=seed, strength=strength)  # the mask is seeded too
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


