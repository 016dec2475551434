"""Attention-controlled generation: the engine hook that runs a Prompt-to-Prompt edit.

A controlled round re-walks the previous round's trajectory (same seed, strength, input latent
and timesteps) with the new prompt, while the previous round's attention is injected:

- **recompute** (default): the previous round is replayed step by step beside the edit, in its
  own U-Net call of the same batch size as the original, so the replay is bit-exact; its
  attention terms are recorded for the current step only and dropped after use. If the previous
  round was itself controlled, its own source is replayed too (the chain is replayed).
- **cache**: the previous round kept a `Trace` (its attention terms for the injection window,
  its latents per step, its blend maps); the edit runs alone, with no extra U-Net call.

`docs/control.md` has the measured cost of both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..engine import DEFAULT_SCHEDULER, DenoiseJob, Engine, Timing
from ..errors import InvalidInputError
from .attention import CallContext, ControlConfig, P2PAttnProcessor, Router, StepRecord, Trace
from .prompts import TokenEdit, make_edit, parse_weights, split_words, word_token_spans


@dataclass
class RoundSpec:
    """How a round was made: enough to replay its trajectory exactly."""

    prompt: str  # may carry (word:w) emphasis
    seed: int
    strength: float = 1.0
    init_latents: torch.Tensor | None = None  # the input latent of an SDEdit round
    source: RoundSpec | None = None  # a controlled round: the round it was edited from
    config: ControlConfig | None = None  # a controlled round: its control settings
    edit_mode: str = "auto"


def _layer_level(name: str, n_blocks: int) -> int:
    part = name.split(".")
    if part[0] == "down_blocks":
        return int(part[1])
    if part[0] == "up_blocks":
        return n_blocks - 1 - int(part[1])
    return n_blocks - 1


def blend_layers(unet: torch.nn.Module, latent_tokens: int, max_tokens: int | None) -> set[str]:
    """Cross-attention layers whose maps feed the local-blend mask: by default those at a quarter
    of the latent's positions or fewer (P2P uses the 16x16 maps of a 64x64 latent)."""
    limit = latent_tokens // 4 if max_tokens is None else max_tokens
    n_blocks = len(unet.config.block_out_channels)
    names = set()
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        tokens = latent_tokens // 4 ** _layer_level(name, n_blocks)
        if tokens <= limit:
            names.add(name)
    return names


def _blend_positions(tokenizer, prompt: str, words: tuple[str, ...] | list[str]) -> list[int]:
    clean, _ = parse_weights(prompt)
    prompt_words = split_words(clean)
    spans = word_token_spans(tokenizer, prompt_words)
    wanted = {w.lower() for w in words}
    return [p for w, s in zip(prompt_words, spans) if w in wanted for p in range(*s) if p < tokenizer.model_max_length]


class Branch:
    """One trajectory: a job, the edit that forms its attention from its source's, and the source
    (a live `Branch` replayed beside it, or a `Trace` kept from before)."""

    def __init__(
        self,
        engine: Engine,
        job: DenoiseJob,
        router: Router,
        *,
        edit: TokenEdit | None = None,
        source: Branch | Trace | None = None,
        config: ControlConfig | None = None,
        record_steps: int = 0,
        keep_trace: bool = False,
        blend: set[str] | None = None,
        blend_mask: torch.Tensor | None = None,
    ):
        self.engine, self.job, self.router = engine, job, router
        self.blend_mask = blend_mask  # a given local-blend mask (e.g. DiffEdit's) instead of attention's
        self.edit, self.source = edit, source
        self.config = config or ControlConfig()
        n = job.num_steps
        self.cross_until = self.config.window(self.config.cross_steps, n) if source is not None else 0
        self.self_until = self.config.window(self.config.self_steps, n) if source is not None else 0
        self.record_steps = record_steps  # cross-attention terms are kept for these first steps
        self.record_self_steps = record_steps  # and self-attention terms for these
        self.keep_trace = keep_trace
        self.provide_maps = False  # a blending branch built on this one reads its maps
        self.trace: list[StepRecord] = []
        self.last: StepRecord | None = None
        self.source_unet_s = 0.0
        self.source_calls = 0
        tok = engine.tokenizer
        self.blend_src: list[int] = []
        self.blend_tgt: list[int] = []
        # Local blend: the edit lands only where the changed (or emphasised) words attend, in
        # either prompt; everywhere else the source's latents are kept. An identity edit changes
        # no word, so it keeps the source everywhere (and so reproduces it exactly).
        self.blending = source is not None and edit is not None and (self.config.local_blend or blend_mask is not None)
        if self.blending and edit is not None and blend_mask is None:
            if self.config.blend_words:
                self.blend_src = _blend_positions(tok, edit.source_prompt, self.config.blend_words)
                self.blend_tgt = _blend_positions(tok, edit.target_prompt, self.config.blend_words)
            else:
                self.blend_src = list(edit.source_changed)
                self.blend_tgt = sorted(set(edit.target_changed) | set(edit.weighted))
        self.blend_from = self.config.window(self.config.blend_start, n)
        self.blend_layers = blend or set()
        # The source is needed while injecting; with a blend mask, to the end (its latents).
        self.source_until = n if self.blending else max(self.cross_until, self.self_until)
        self._src_acc: torch.Tensor | None = None
        self._own_acc: torch.Tensor | None = None
        self._source_latents: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        if isinstance(source, Branch):
            source.record_steps = max(source.record_steps, self.cross_until)
            source.record_self_steps = max(source.record_self_steps, self.self_until)
            if self.blending:
                source.blend_layers = self.blend_layers
                source.provide_maps = True
        elif isinstance(source, Trace):
            if source.num_steps != n:
                raise InvalidInputError(f"the cached trace has {source.num_steps} steps, this round {n}")
            if source.record_steps < self.cross_until or source.record_self_steps < self.self_until:
                raise InvalidInputError(
                    f"the cached trace covers {source.record_steps} / {source.record_self_steps} steps of "
                    f"cross / self attention; injection needs {self.cross_until} / {self.self_until}"
                )

    # ----- stepping -----------------------------------------------------------------------
    def pre_step(self) -> None:
        i = self.job.step_index
        src: StepRecord | None = None
        if self.source is not None and i < self.source_until:
            if isinstance(self.source, Branch):
                start = time.perf_counter()
                calls = self.source.source_calls
                self.source.advance()
                self.source_calls += 1 + self.source.source_calls - calls
                self.source_unet_s += time.perf_counter() - start
                src = self.source.last
            else:
                src = self.source.steps[i]
        self._source_latents = None if src is None else src.latents
        record = StepRecord()
        needs_maps = (self.blending and self.blend_mask is None) or self.keep_trace or self.provide_maps
        self.router.ctx = CallContext(
            step=i,
            num_steps=self.job.num_steps,
            source=src,
            edit=self.edit,
            inject_cross=i < self.cross_until,
            inject_self=i < self.self_until,
            config=self.config,
            record=record,
            cond_row=1 if self.job.uses_guidance else 0,
            blend_layers=self.blend_layers if needs_maps else set(),
            record_terms=i < self.record_steps,
            record_self=i < self.record_self_steps,
        )
        self._src_record = src

    def post_step(self) -> None:
        ctx = self.router.ctx
        self.router.ctx = None
        assert ctx is not None and ctx.record is not None
        record, src = ctx.record, self._src_record
        if self.blending and src is not None:
            self._blend(record, src, ctx.step)
        record.latents = self.job.latents
        self.last = record
        if self.keep_trace:
            self.trace.append(record)
        if isinstance(self.source, Branch):
            self.source.last = None  # its terms were used; let them go

    def advance(self) -> None:
        self.pre_step()
        self.engine.step([self.job])
        self.post_step()

    def _blend(self, record: StepRecord, src: StepRecord, step: int) -> None:
        if self.blend_mask is not None:  # a given mask: the source's latents everywhere outside it
            if src.latents is not None and step >= self.blend_from:
                self.last_mask = self.blend_mask
                self.job.latents = torch.lerp(src.latents, self.job.latents, self.blend_mask.to(src.latents))
            return
        if src.blend_map is None or record.blend_map is None or src.latents is None:
            return
        self._src_acc = src.blend_map if self._src_acc is None else self._src_acc + src.blend_map
        self._own_acc = record.blend_map if self._own_acc is None else self._own_acc + record.blend_map
        if step < self.blend_from:
            return
        size = self.job.latents.shape[-2:]
        mask = torch.zeros((1, 1, *size), dtype=torch.bool, device=self.job.latents.device)
        for acc, positions in ((self._src_acc, self.blend_src), (self._own_acc, self.blend_tgt)):
            if not positions:
                continue
            maps = acc[:, positions].sum(1, keepdim=True)  # (1, 1, s, s)
            maps = F.max_pool2d(maps, 3, 1, padding=1)
            maps = F.interpolate(maps, size=size)
            maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
            mask = mask | (maps > self.config.blend_threshold)
        self.last_mask = mask
        x_src = src.latents
        self.job.latents = x_src + mask.to(x_src.dtype) * (self.job.latents - x_src)

    def to_trace(self) -> Trace:
        return Trace(
            steps=self.trace, num_steps=self.job.num_steps, record_steps=self.record_steps,
            record_self_steps=self.record_self_steps,
        )


class PromptToPrompt:
    """The engine's `AttentionHook` for one controlled round: installs `P2PAttnProcessor`s on
    every attention layer for the run only (the originals come back on `remove`), replays or
    reads the source each step, and applies the local blend after each step.

    Use `controlled_generate`, which builds it; `bind(job)` must come before the run."""

    def __init__(self, branch_factory):
        self._factory = branch_factory
        self.router = Router()
        self.branch: Branch | None = None
        self._saved: dict[str, Any] | None = None

    def bind(self, job: DenoiseJob) -> Branch:
        self.branch = self._factory(job, self.router)
        return self.branch

    def install(self, unet: torch.nn.Module) -> None:
        if self.branch is None:
            raise RuntimeError("PromptToPrompt.bind(job) must be called before the run")
        self._saved = dict(unet.attn_processors)
        unet.set_attn_processor(
            {name: P2PAttnProcessor(self.router, name, ".attn2." in name) for name in self._saved}
        )

    def on_step(self, step_index: int, num_steps: int, timestep: int) -> None:
        assert self.branch is not None
        self.branch.pre_step()

    def after_step(self, step_index: int, num_steps: int) -> None:
        assert self.branch is not None
        self.branch.post_step()

    def remove(self, unet: torch.nn.Module) -> None:
        self.router.ctx = None
        if self._saved is not None:
            unet.set_attn_processor(self._saved)
            self._saved = None


@dataclass
class ControlledGeneration:
    latents: torch.Tensor
    image: Image.Image | None
    timing: Timing
    edit: TokenEdit | None
    trace: Trace | None  # kept for the next round when keep_trace=True
    source_calls: int  # U-Net calls spent replaying the source
    unet_steps: int
    mask: torch.Tensor | None = None  # the last local-blend mask, if any
    stats: dict[str, Any] = field(default_factory=dict)
    prompt_truncated: bool = False
    unknown_words: tuple[str, ...] = ()
    source_latents: torch.Tensor | None = None  # the replayed source's final latents, if it ran to the end
    preview_decoded: bool = False  # `image` came from the engine's tiny preview decoder


def controlled_generate(
    engine: Engine,
    prompt: str,
    source: RoundSpec | None,
    *,
    steps: int = 20,
    config: ControlConfig | None = None,
    trace: Trace | None = None,
    keep_trace: bool = False,
    record_steps: int | None = None,
    guidance_scale: float = 7.5,
    scheduler: str = DEFAULT_SCHEDULER,
    negative_prompt: str = "",
    edit_mode: str = "auto",
    decode: bool = True,
    progress: bool = False,
    seed: int | None = None,
    strength: float = 1.0,
    init_latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    blend_mask: torch.Tensor | None = None,
    preview: bool = False,
) -> ControlledGeneration:
    """Generate `prompt` under attention control from the round `source` describes.

    The round walks the source's trajectory: its seed, strength and input latent. With `trace`
    (the source's kept `Trace`) the source is not recomputed. `keep_trace` keeps this round's
    own trace (for `record_steps` steps, default the config's injection window) for the next.

    With `source=None` this is a plain round (seed / strength / init_latents as given) that
    only records, so the next round can use its trace. `blend_mask` ((1, 1, h, w), 1 = edit) is
    the local blend's mask given outright (e.g. `control.mask.plan_local_edit`'s region) instead of the
    one the changed words' attention draws. `preview` decodes with the engine's tiny preview
    decoder where it has one.
    """
    config = config or ControlConfig()
    timing = Timing()
    start = time.perf_counter()
    guidance = guidance_scale > 1.0
    clean, _ = parse_weights(prompt)
    embeddings = engine.encode_prompt(clean, negative_prompt, guidance=guidance)
    edit = None
    if source is not None:
        edit = make_edit(engine.tokenizer, source.prompt, prompt, mode=edit_mode)
        seed, strength, init_latents = source.seed, source.strength, source.init_latents
    elif seed is None:
        raise InvalidInputError("a plain recorded round needs a seed")
    timing.text_encode_s = time.perf_counter() - start
    n_run_record = record_steps

    def make_source_branch(spec: RoundSpec, router: Router, n: int) -> Branch:
        emb = engine.encode_prompt(parse_weights(spec.prompt)[0], negative_prompt, guidance=guidance)
        job = engine.start(
            emb, seed=spec.seed, steps=steps, strength=spec.strength, init_latents=spec.init_latents,
            guidance_scale=guidance_scale, scheduler=scheduler, height=height, width=width,
        )
        inner = None
        inner_edit = None
        if spec.source is not None:
            inner = make_source_branch(spec.source, router, n)
            inner_edit = make_edit(engine.tokenizer, spec.source.prompt, spec.prompt, mode=spec.edit_mode)
        return Branch(
            engine, job, router, edit=inner_edit, source=inner, config=spec.config or config,
            blend=blend_layers(engine.unet, job.latents[0, 0].numel(), (spec.config or config).blend_max_tokens),
        )

    def factory(job: DenoiseJob, router: Router) -> Branch:
        layers = blend_layers(engine.unet, job.latents[0, 0].numel(), config.blend_max_tokens)
        src: Branch | Trace | None = trace
        if src is None and source is not None:
            src = make_source_branch(source, router, job.num_steps)
        n = job.num_steps
        rec = n_run_record
        rec_self = n_run_record
        if rec is None:
            rec = config.window(config.cross_steps, n) if keep_trace else 0
            rec_self = config.window(config.self_steps, n) if keep_trace else 0
        branch = Branch(
            engine, job, router, edit=edit, source=src, config=config,
            record_steps=rec, keep_trace=keep_trace, blend=layers, blend_mask=blend_mask,
        )
        branch.record_self_steps = rec_self if rec_self is not None else rec
        return branch

    hook = PromptToPrompt(factory)
    job = engine.start(
        embeddings, seed=seed, steps=steps, strength=strength, init_latents=init_latents,
        guidance_scale=guidance_scale, scheduler=scheduler, hook=hook, height=height, width=width,
    )
    job.timing = timing
    branch = hook.bind(job)
    engine.run([job], progress=progress)
    timing.unet_s += branch.source_unet_s
    timing.unet_compute_s += branch.source_unet_s
    timing.unet_calls += branch.source_calls
    image = None
    if decode:
        start = time.perf_counter()
        image = engine.decode(job.latents, preview=preview)[0]
        timing.decode_s = time.perf_counter() - start
    result_trace = branch.to_trace() if keep_trace else None
    return ControlledGeneration(
        latents=job.latents,
        image=image,
        timing=timing,
        edit=edit,
        trace=result_trace,
        source_calls=branch.source_calls,
        unet_steps=job.num_steps,
        mask=branch.last_mask,
        prompt_truncated=embeddings.truncated,
        unknown_words=embeddings.unknown_words,
        preview_decoded=decode and engine.uses_preview_decoder(preview),
        stats={
            "processor_calls": hook.router.calls,
            "injected_calls": hook.router.injected,
            "trace_bytes": result_trace.nbytes() if result_trace else 0,
        },
    )
