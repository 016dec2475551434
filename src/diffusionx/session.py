"""The edge session: a person's rounds of prompts, previews, and the final cloud refinement.

Round 1 generates from noise. Round k starts from the head round's latent (normally round k-1,
or any earlier round after `back(n)`) at the strength the policy picks, or fresh when it says 1.0.
A round is added to the history only once it has succeeded, so a failed round loses nothing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .cloud import CloudRefiner, Refiner, RefineRequest, RefineResult
from .engine import (
    DEFAULT_SCHEDULER,
    AttentionHook,
    DenoiseJob,
    Generation,
    Timing,
    check_seed,
    check_steps,
    check_strength,
    steps_for_strength,
)
from .errors import InvalidInputError, RoundNotFoundError
from .models import ModelPair
from .policies import FixedStrength, StrengthPolicy
from .wire import image_to_png, latents_from_bytes, latents_to_bytes

ROUND_MODES = ("fresh", "sdedit", "controlled", "local", "auto")
FINALIZE_MODES = ("refine", "regenerate")  # keep the approved preview, or a new cloud image of the prompt


@dataclass
class Round:
    index: int  # 1-based, in the order rounds were made
    prompt: str
    seed: int
    strength: float  # 1.0 = fresh generation
    steps: int
    unet_steps: int
    mode: str  # "fresh" | "sdedit" | "controlled" | "local"
    parent: int | None  # the round whose latent this one started from
    latents: torch.Tensor
    image: Image.Image
    timing: Timing
    prompt_truncated: bool = False
    unknown_words: tuple[str, ...] = ()  # words the (embedded) edge model never saw
    preview_decoded: bool = False  # `image` came from the tiny preview decoder, not the VAE

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "mode": self.mode,
            "parent": self.parent,
            "strength": self.strength,
            "steps": self.steps,
            "unet_steps": self.unet_steps,
            "edge_seconds": self.timing.total_s,
            "timing": self.timing.as_dict(),
            "prompt_truncated": self.prompt_truncated,
            "out_of_vocabulary": list(self.unknown_words),
            "decoder": "preview" if self.preview_decoded else "vae",
        }


@dataclass
class FinalResult:
    prompt: str
    source_round: int
    image: Image.Image
    latents: torch.Tensor | None
    refined: bool  # False: the cloud could not be reached and this is the edge preview
    reason: str | None = None
    strength: float = 0.0
    steps: int = 0
    unet_steps: int = 0
    cloud_seconds: float = 0.0
    cloud_timing: Timing = field(default_factory=Timing)
    edge_decode_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "source_round": self.source_round,
            "refined": self.refined,
            "reason": self.reason,
            "strength": self.strength,
            "steps": self.steps,
            "unet_steps": self.unet_steps,
            "cloud_seconds": self.cloud_seconds,
            "cloud_timing": self.cloud_timing.as_dict(),
            "edge_decode_s": self.edge_decode_s,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


@dataclass
class RoundPlan:
    """A round decided but not yet rendered: `EdgeSession.plan` makes it without touching the
    session, `Engine.run` renders its job (with other sessions' jobs in the same U-Net calls),
    `EdgeSession.commit` adds the round. Several plans from one head may be rendered and one
    committed (the predictors' strength sweeps)."""

    prompt: str
    seed: int
    strength: float
    parent: int | None  # the head round it starts from (None: from noise)
    job: DenoiseJob
    init_latents: torch.Tensor | None = None


@dataclass
class FinalizePlan:
    """The refinement request for the head round (`EdgeSession.finalize_request`)."""

    source: Round
    request: RefineRequest


class EdgeSession:
    def __init__(
        self,
        pair: ModelPair,
        *,
        policy: StrengthPolicy | None = None,
        cloud: Refiner | None = None,
        steps: int | None = None,
        cloud_steps: int | None = None,
        guidance_scale: float = 7.5,
        seed: int = 0,
        scheduler: str = DEFAULT_SCHEDULER,
        control: Any = None,
        control_cache: bool = False,
        preview_decoder: bool = True,
    ):
        from .control import ControlConfig

        self.pair = pair
        # Previews through the edge's tiny decoder when it has one; the final keeps the VAE.
        self.preview_decoder = pair.edge.uses_preview_decoder(bool(preview_decoder))
        # Attention control (docs/control.md): its settings, and whether each round keeps its
        # attention trace (memory) so a controlled next round need not replay it (time).
        self.control = control or ControlConfig()
        self.control_cache = bool(control_cache)
        self._specs: dict[int, Any] = {}  # round index -> control.RoundSpec (how to replay it)
        self._trace: tuple[int, Any] | None = None  # (round index, control.Trace) of one round
        self.policy = policy or FixedStrength()
        self.cloud = cloud or CloudRefiner(pair.cloud)
        self.steps = check_steps(pair.steps_or_default(steps))
        self.cloud_steps = check_steps(cloud_steps or self.steps)
        self.guidance_scale = guidance_scale
        self.seed = check_seed(seed)
        self.scheduler = scheduler
        self.rounds: list[Round] = []
        self.head: int | None = None  # the round the next one builds on
        self.final: FinalResult | None = None

    # ----- rounds -------------------------------------------------------------------------
    def round(self, index: int) -> Round:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= len(self.rounds):
            have = f"rounds 1-{len(self.rounds)}" if self.rounds else "no rounds yet"
            raise RoundNotFoundError(f"round {index!r} does not exist; this session has {have}")
        return self.rounds[index - 1]

    @property
    def current(self) -> Round | None:
        return None if self.head is None else self.round(self.head)

    def back(self, index: int) -> Round:
        """Make round `index` the head: the next round branches from it. History is kept."""
        target = self.round(index)
        self.head = index
        return target

    def generate(
        self,
        prompt: str,
        *,
        strength: float | None = None,
        seed: int | None = None,
        hook: AttentionHook | None = None,
        progress: bool = False,
        mode: str | None = None,
    ) -> Round:
        """Make the next round's preview from `prompt`.

        `mode` picks how the round relates to the head round: "fresh" (from noise), "sdedit"
        (re-noise the head's latent to `strength` or the policy's), "controlled" (Prompt-to-Prompt:
        re-walk the head round's trajectory with the new prompt under attention control; it keeps
        the head's seed and strength), "local" (regenerate only where the edit lands, found as
        DiffEdit does, and keep the head's latent everywhere else; `strength` inside the region,
        default 1) or "auto" (`control.auto_mode`'s rule from the word edit). None keeps the plain
        behaviour: the policy's strength, 1.0 meaning fresh.
        """
        if mode is not None and mode not in ROUND_MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(ROUND_MODES)}, got {mode!r}")
        previous = self.current
        seed = self.seed if seed is None else check_seed(seed)
        if mode == "auto":
            from .control import auto_mode

            mode = "fresh" if previous is None else auto_mode(previous.prompt, prompt)[0]
        if mode == "controlled" and previous is not None:
            if hook is not None:
                raise InvalidInputError("a controlled round brings its own attention hook; pass no hook")
            return self._controlled(prompt, previous, progress)
        if mode == "local" and previous is not None:
            if hook is not None:
                raise InvalidInputError("a local round takes no attention hook; pass no hook")
            return self._local(prompt, previous, seed, strength, progress)
        if mode == "fresh":
            strength = 1.0  # asked to start over
        if self.control_cache or hook is not None:
            return self._hooked(prompt, seed, strength, hook, progress)
        plan = self.plan(prompt, strength=strength, seed=seed)
        self.pair.edge.run([plan.job], progress=progress)
        return self.commit(plan)

    def plan(self, prompt: str, *, strength: float | None = None, seed: int | None = None) -> RoundPlan:
        """The next plain round (fresh or SDEdit) from the head, at `strength` or the policy's;
        the session is unchanged until `commit`."""
        previous = self.current
        seed = self.seed if seed is None else check_seed(seed)
        if previous is None:
            strength = 1.0  # nothing to start from
        elif strength is None:
            strength = self.policy.edge_strength(previous.prompt, prompt, previous.latents)
        strength = check_strength(strength)
        init_latents = None if previous is None or strength == 1.0 else previous.latents
        job = self.pair.edge.prepare(prompt, seed=seed, steps=self.steps, strength=strength,
                                     init_latents=init_latents, guidance_scale=self.guidance_scale,
                                     scheduler=self.scheduler)
        parent = None if init_latents is None else previous.index
        return RoundPlan(prompt, seed, strength, parent, job, init_latents)

    def commit(self, plan: RoundPlan, generation: Generation | None = None) -> Round:
        """Add the round `plan` rendered (`generation`: its finished result, e.g. from one batched
        `Engine.finish_all`; default: finish it here)."""
        from .control import RoundSpec

        if plan.parent is not None and (self.current is None or self.current.index != plan.parent):
            raise InvalidInputError(f"this plan starts from round {plan.parent}, but the head moved")
        generation = generation or self.pair.edge.finish(plan.job, preview=self.preview_decoder)
        new = self._round_from(plan.prompt, plan.seed, plan.strength, plan.parent, generation,
                               "fresh" if plan.strength == 1.0 else "sdedit")
        self._specs[new.index] = RoundSpec(plan.prompt, plan.seed, plan.strength, plan.init_latents)
        return self._append(new, None)

    def _round_from(self, prompt: str, seed: int, strength: float, parent: int | None, generation, mode: str) -> Round:
        return Round(
            index=len(self.rounds) + 1,
            prompt=prompt,
            seed=seed,
            strength=strength,
            steps=self.steps,
            unet_steps=generation.unet_steps,
            mode=mode,
            parent=parent,
            latents=generation.latents,
            image=generation.image,
            timing=generation.timing,
            prompt_truncated=generation.prompt_truncated,
            unknown_words=generation.unknown_words,
            preview_decoded=generation.preview_decoded,
        )

    def _hooked(self, prompt: str, seed: int, strength: float | None, hook, progress: bool) -> Round:
        """A plain round under a caller's attention hook, or one that records its attention trace
        for a controlled next round (`control_cache`)."""
        previous = self.current
        if previous is None:
            strength = 1.0
        elif strength is None:
            strength = self.policy.edge_strength(previous.prompt, prompt, previous.latents)
        strength = check_strength(strength)
        init_latents = None if previous is None or strength == 1.0 else previous.latents
        if self.control_cache and hook is None:
            generation = self._recorded(prompt, seed, strength, init_latents, progress)
        else:
            generation = self.pair.edge.generate(
                prompt, seed=seed, steps=self.steps, strength=strength, init_latents=init_latents,
                guidance_scale=self.guidance_scale, scheduler=self.scheduler, hook=hook, progress=progress,
                preview=self.preview_decoder,
            )
        mode = "fresh" if strength == 1.0 else ("controlled" if hook is not None else "sdedit")
        parent = None if init_latents is None else previous.index
        new = self._round_from(prompt, seed, strength, parent, generation, mode)
        if hook is None:
            from .control import RoundSpec

            self._specs[new.index] = RoundSpec(prompt, seed, strength, init_latents)
        return self._append(new, getattr(generation, "trace", None))

    def _append(self, new: Round, trace: Any) -> Round:
        self.rounds.append(new)
        self.head = new.index
        if trace is not None:
            self._trace = (new.index, trace)
        return new

    def _recorded(self, prompt, seed, strength, init_latents, progress):
        """A plain round that keeps its attention trace for a controlled next round."""
        from .control import controlled_generate

        out = controlled_generate(
            self.pair.edge, prompt, None, seed=seed, strength=strength, init_latents=init_latents,
            steps=self.steps, config=self.control, keep_trace=True, guidance_scale=self.guidance_scale,
            scheduler=self.scheduler, progress=progress, preview=self.preview_decoder,
        )
        return out

    def _controlled(self, prompt: str, previous: Round, progress: bool) -> Round:
        from .control import RoundSpec, controlled_generate

        spec = self._specs.get(previous.index)
        if spec is None:
            raise InvalidInputError(
                f"round {previous.index} was made with a custom hook or as a local edit and cannot be re-walked; "
                "pick fresh, sdedit or local for this round"
            )
        trace = self._trace[1] if self._trace is not None and self._trace[0] == previous.index else None
        out = controlled_generate(
            self.pair.edge, prompt, spec, steps=self.steps, config=self.control, trace=trace,
            keep_trace=self.control_cache, guidance_scale=self.guidance_scale, scheduler=self.scheduler,
            progress=progress, preview=self.preview_decoder,
        )
        new = self._round_from(prompt, spec.seed, spec.strength, previous.index, out, "controlled")
        self._specs[new.index] = RoundSpec(
            prompt, spec.seed, spec.strength, spec.init_latents, source=spec, config=self.control
        )
        return self._append(new, out.trace)

    def _local(self, prompt: str, previous: Round, seed: int, strength: float | None, progress: bool) -> Round:
        """Regenerate the region the edit changes (`control.mask.plan_local_edit`) and keep the
        head's latent elsewhere; the mask's U-Net calls are charged to the round."""
        from .control.mask import LOCAL_FREE_STEPS, LOCAL_STRENGTH, MASK_UNET_CALLS, finish_local, plan_local_edit

        strength = check_strength(LOCAL_STRENGTH if strength is None else strength)
        start = time.perf_counter()
        plan = plan_local_edit(self.pair.edge, previous.latents, previous.prompt, prompt, seed=seed)
        mask_s = time.perf_counter() - start
        job = self.pair.edge.prepare(prompt, seed=seed, steps=self.steps, strength=strength,
                                     init_latents=previous.latents, guidance_scale=self.guidance_scale,
                                     scheduler=self.scheduler, edit_mask=plan.region,
                                     free_steps=round(LOCAL_FREE_STEPS * steps_for_strength(strength, self.steps)))
        job.timing.unet_s += mask_s
        job.timing.unet_compute_s += mask_s
        job.timing.unet_calls += MASK_UNET_CALLS
        self.pair.edge.run([job], progress=progress)
        generation = finish_local(self.pair.edge, plan, previous.image,
                                  self.pair.edge.finish(job, preview=self.preview_decoder))
        new = self._round_from(prompt, seed, strength, previous.index, generation, "local")
        return self._append(new, None)

    # ----- finalize -----------------------------------------------------------------------
    def finalize(self, *, strength: float | None = None, load: dict[str, Any] | None = None,
                 mode: str = "refine", on_edge: Callable[..., Any] | None = None) -> FinalResult:
        """Send the head round to the cloud. `mode` "refine" keeps the approved preview (the
        policy's cloud strength, or `strength`); "regenerate" asks the cloud for a new image of the
        prompt from the preview's seed (strength 1). If the cloud fails, the result is the preview
        itself, marked refined=False with the reason: the user never loses their image.

        `on_edge(fn, *args, **kwargs)` runs the edge's own work (the policy, the decodes) where the
        caller wants it, e.g. the web UI's render thread, while the cloud's round trip stays on the
        calling thread and blocks no other render."""
        def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs) if on_edge is None else on_edge(fn, *args, **kwargs)

        plan = run(self.finalize_request, strength=strength, load=load, mode=mode)
        try:
            result = self.cloud.refine(plan.request)
        except InvalidInputError:
            raise
        except Exception as err:
            return run(self.receive, plan, error=err)
        return run(self.receive, plan, result)

    def finalize_request(self, *, strength: float | None = None, load: dict[str, Any] | None = None,
                         mode: str = "refine") -> FinalizePlan:
        """The refinement request for the head round, at `strength` or the policy's (mode refine)
        or 1 (mode regenerate): what crosses the wire (latents when edge and cloud share a latent
        space, else a PNG)."""
        if mode not in FINALIZE_MODES:
            raise InvalidInputError(f"finalize mode must be one of {', '.join(FINALIZE_MODES)}, got {mode!r}")
        source = self.current
        if source is None:
            raise InvalidInputError("nothing to finalize yet: generate a preview first")
        if mode == "regenerate":
            if strength not in (None, 1.0):
                raise InvalidInputError("regenerate is strength 1; pass no strength, or use mode refine")
            strength = 1.0
        if strength is None:
            strength = self.policy.cloud_strength(source.prompt, source.latents, load)
        strength = check_strength(strength)
        shared = self.pair.shared_latent_space
        request = RefineRequest(
            prompt=source.prompt,
            strength=strength,
            steps=self.cloud_steps,
            seed=source.seed,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            latents=latents_to_bytes(source.latents) if shared else None,
            image_png=None if shared else image_to_png(self._vae_image(source)),
            return_format="latent" if shared else "png",
        )
        return FinalizePlan(source, request)

    def receive(self, plan: FinalizePlan, result: RefineResult | None = None, error: Exception | None = None,
                ) -> FinalResult:
        """The final from the cloud's answer to `plan`, or (with `error`) the preview itself,
        marked unrefined with the reason."""
        source, request = plan.source, plan.request
        if result is None:
            reason = f"cloud refinement failed ({type(error).__name__}: {error}); showing the edge preview"
            self.final = FinalResult(
                prompt=source.prompt,
                source_round=source.index,
                image=self._vae_image(source),
                latents=source.latents,
                refined=False,
                reason=reason,
                strength=request.strength,
                steps=self.cloud_steps,
                bytes_up=request.upload_bytes,
            )
            return self.final
        self.final = self._receive(source, request, result)
        return self.final

    def _vae_image(self, source: Round) -> Image.Image:
        """The round's image as the VAE decodes it (a final, or what the cloud starts from, is
        never the tiny preview decoder's)."""
        if not source.preview_decoded:
            return source.image
        return self.pair.edge.decode(source.latents.to(self.pair.edge.device, self.pair.edge.dtype))[0]

    def _receive(self, source: Round, request: RefineRequest, result: RefineResult) -> FinalResult:
        start = time.perf_counter()
        if result.return_format == "latent":
            latents = latents_from_bytes(result.payload)
            image = self.pair.edge.decode(latents.to(self.pair.edge.device, self.pair.edge.dtype))[0]
        else:
            latents, image = None, Image.open(io.BytesIO(result.payload)).convert("RGB")
        return FinalResult(
            prompt=source.prompt,
            source_round=source.index,
            image=image,
            latents=latents,
            refined=True,
            strength=result.strength,
            steps=result.steps,
            unet_steps=result.unet_steps,
            cloud_seconds=result.cloud_seconds,
            cloud_timing=result.timing,
            edge_decode_s=time.perf_counter() - start,
            bytes_up=request.upload_bytes,
            bytes_down=len(result.payload),
        )

    def history(self) -> list[dict[str, Any]]:
        return [r.summary() for r in self.rounds]

    def restore(self, rounds: list[Round], head: int | None, final: FinalResult | None = None) -> None:
        """Put back rounds kept from an earlier run (the web UI's store): the history, the head,
        the final, and how each round was made, so that the next round (a controlled one too)
        continues exactly as it would have in the session that made them."""
        from .control import RoundSpec

        specs: dict[int, Any] = {}
        for i, r in enumerate(rounds, start=1):
            if r.index != i:
                raise InvalidInputError(f"round {i} is numbered {r.index}; rounds must be 1, 2, ... in order")
            if r.parent is not None and not 1 <= r.parent < i:
                raise InvalidInputError(f"round {i} names parent {r.parent!r}, which is not an earlier round")
            if r.mode == "local":
                continue  # a masked round cannot be re-walked by a controlled one
            if r.mode == "controlled":
                source = specs.get(r.parent) if r.parent is not None else None
                if source is not None:
                    specs[i] = RoundSpec(r.prompt, source.seed, source.strength, source.init_latents,
                                         source=source, config=self.control)
                continue
            init = rounds[r.parent - 1].latents if r.parent is not None and r.strength != 1.0 else None
            specs[i] = RoundSpec(r.prompt, r.seed, r.strength, init)
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or not 1 <= head <= len(rounds)):
            raise InvalidInputError(f"head {head!r} is not one of the {len(rounds)} rounds")
        if final is not None and not 1 <= final.source_round <= len(rounds):
            raise InvalidInputError(f"the final names round {final.source_round}, which is not one of the rounds")
        self.rounds, self.head, self.final = list(rounds), head, final
        self._specs, self._trace = specs, None


# ----- many sessions in lock-step: one protocol for the product, the benchmark and the collector
def advance(sessions: list[EdgeSession], prompts: list[str], *, strengths: list[float | None] | None = None,
            batch: int = 32, progress: bool = False, desc: str | None = None) -> list[Round]:
    """One round for each session (plain rounds; `strengths`: None = each one's policy), their
    U-Net steps shared `batch` sessions at a time. All sessions must share one edge engine."""
    if not sessions:
        return []
    engine = sessions[0].pair.edge
    if any(s.pair.edge is not engine for s in sessions):
        raise ValueError("advance() batches sessions of one edge engine")
    strengths = strengths or [None] * len(sessions)
    plans = [s.plan(p, strength=st) for s, p, st in zip(sessions, prompts, strengths)]
    engine.run([p.job for p in plans], progress=progress, desc=desc, batch=batch)
    generations: list[Generation | None] = [None] * len(plans)
    for preview in (False, True):  # the sessions that decode previews with the tiny decoder, and the rest
        group = [i for i, s in enumerate(sessions) if s.preview_decoder == preview]
        for i, g in zip(group, engine.finish_all([plans[i].job for i in group], preview=preview)):
            generations[i] = g
    return [s.commit(p, g) for s, p, g in zip(sessions, plans, generations)]


def finalize_all(sessions: list[EdgeSession], refiner: CloudRefiner, *, strengths: list[float | None] | None = None,
                 batch: int = 32) -> list[FinalResult]:
    """Finalize every session through one in-process refiner, `batch` refinements per U-Net call."""
    strengths = strengths or [None] * len(sessions)
    plans = [s.finalize_request(strength=st) for s, st in zip(sessions, strengths)]
    results = refiner.refine_all([p.request for p in plans], batch=batch)
    return [s.receive(p, r) for s, p, r in zip(sessions, plans, results)]
