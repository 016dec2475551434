"""Prompt-to-Prompt attention processors and branches.

The processors never build an attention map for their output. Every P2P edit is linear in the
attention map on the right (``P_new = P_src @ A``), and ``(P @ A) @ V == P @ (A @ V)``, so an
injected layer computes ``SDPA(Q_src, K_src, A @ V_edit)`` with the default SDPA kernel:

- cross-attention replace / refine / reweight: ``A = matrix`` of the `TokenEdit`, plus a term
  ``SDPA(Q_edit, K_edit, diag(own) @ V_edit)`` for tokens with no source counterpart;
- self-attention injection: ``SDPA(Q_src, K_src, V_edit)``.

A layer's effective attention is a list of `Term`s (Q, K, A). A branch records its terms per
step; a branch built on a *controlled* source composes the source's terms with its own edit
(``A_i @ matrix``), so edits chain round after round. Only the local-blend layers build explicit
(small) maps, for the mask.

A branch whose prompt equals its source computes, in every layer, the very same SDPA call on the
very same tensors as the source did, so it reproduces the source bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .prompts import TokenEdit


@dataclass(frozen=True)
class ControlConfig:
    """Prompt-to-Prompt settings. Fractions are of the round's U-Net steps, counted from its first."""

    cross_steps: float = 0.8  # inject cross-attention for this fraction of the steps
    self_steps: float = 0.4  # inject self-attention for this fraction
    self_max_tokens: int = 256  # only self-attention layers with at most this many queries (P2P: 16x16)
    local_blend: bool = True  # edit only where the changed words attend
    blend_words: tuple[str, ...] = ()  # words for the blend mask; () = the edit's changed words
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # blend from this fraction of the steps on
    blend_max_tokens: int | None = None  # blend maps from cross layers with at most this many queries

    def __post_init__(self) -> None:
        for name in ("cross_steps", "self_steps", "blend_start", "blend_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def window(self, fraction: float, num_steps: int) -> int:
        return round(fraction * num_steps)


@dataclass
class Term:
    q: torch.Tensor  # (B, heads, N, d)
    k: torch.Tensor  # (B, heads, M, d)
    a: torch.Tensor | None  # (M, M) right factor of the map, None = identity


@dataclass
class StepRecord:
    """What a branch did in one step: each attention layer's terms (within the record window),
    its latents after the step, and the blend maps of that step (cond rows, head mean)."""

    terms: dict[str, list[Term]] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    blend_map: torch.Tensor | None = None  # (side, side, tokens) summed over blend layers

    def nbytes(self) -> int:
        seen, total = set(), 0
        tensors = [self.latents, self.blend_map]
        for terms in self.terms.values():
            for t in terms:
                tensors += [t.q, t.k, t.a]
        for x in tensors:
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        return total


@dataclass
class Trace:
    """A finished branch's records, kept so the next round can inject without recomputing."""

    steps: list[StepRecord]
    num_steps: int
    record_steps: int  # steps with cross-attention terms
    record_self_steps: int = 0  # steps with self-attention terms

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.steps)


@dataclass
class CallContext:
    """Set by the running branch for the duration of one U-Net call."""

    step: int
    num_steps: int
    source: StepRecord | None  # the source's record of this step (None: no injection)
    edit: TokenEdit | None
    inject_cross: bool
    inject_self: bool
    config: ControlConfig
    record: StepRecord | None  # where this call records its terms (None: not needed)
    cond_row: int  # which row of the call is the conditional one (for blend maps)
    record_terms: bool = False  # keep this call's cross-attention terms (a later branch injects them)
    record_self: bool = False  # keep this call's self-attention terms
    blend_layers: set[str] = field(default_factory=set)


class Router:
    """Shared by all processors of one U-Net: holds the context of the call in progress."""

    def __init__(self) -> None:
        self.ctx: CallContext | None = None
        self.calls = 0  # processor calls that went through control (for tests: no silent no-op)
        self.injected = 0  # processor calls that used source attention
        self.layer_tokens: dict[str, int] = {}


def _apply(a: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    return v if a is None else torch.matmul(a.to(v.dtype), v)


def _compose(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a @ b


class P2PAttnProcessor:
    """Drop-in for diffusers' `AttnProcessor2_0` (same call signature and, without an edit, the
    same operations) that records and injects attention as the router's context says."""

    def __init__(self, router: Router, name: str, is_cross: bool):
        self.router, self.name, self.is_cross = router, name, is_cross

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask, attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _attend(self, q, k, v, mask, scale) -> torch.Tensor:
        router, ctx = self.router, self.router.ctx
        router.layer_tokens[self.name] = q.shape[2]
        if ctx is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        router.calls += 1
        source = ctx.source.terms.get(self.name) if ctx.source is not None else None
        inject = source is not None and (
            ctx.inject_cross if self.is_cross else (ctx.inject_self and q.shape[2] <= ctx.config.self_max_tokens)
        )
        if inject and source[0].q.shape[0] != q.shape[0]:
            raise ValueError(f"{self.name}: source recorded {source[0].q.shape[0]} rows, this call has {q.shape[0]}")
        if not inject:
            terms = [Term(q, k, None)]
        elif self.is_cross:
            edit = ctx.edit
            matrix = None if edit is None else edit.matrix
            terms = [Term(t.q, t.k, _compose(t.a, matrix)) for t in source]
            if edit is not None and edit.own is not None:
                terms.append(Term(q, k, torch.diag(edit.own)))
            router.injected += 1
        else:
            terms = list(source)
            router.injected += 1
        out = None
        for t in terms:
            part = F.scaled_dot_product_attention(t.q, t.k, _apply(t.a, v), attn_mask=mask, dropout_p=0.0)
            out = part if out is None else out + part
        if ctx.record is not None:
            if self.name in ctx.blend_layers:
                self._blend_map(ctx, terms, scale)
            # Keep only what a later branch can inject: cross layers within the cross window,
            # self layers small enough for self injection within the self window.
            small = q.shape[2] <= ctx.config.self_max_tokens
            if ctx.record_terms if self.is_cross else (ctx.record_self and small):
                ctx.record.terms[self.name] = terms
        return out

    def _blend_map(self, ctx: CallContext, terms: list[Term], scale: float) -> None:
        """The conditional row's effective cross-attention map, head mean, as (side, side, tokens)."""
        row = ctx.cond_row
        total = None
        for t in terms:
            probs = torch.softmax((t.q[row] @ t.k[row].transpose(-1, -2)) * scale, dim=-1).mean(0)
            if t.a is not None:
                probs = probs @ t.a.to(probs.dtype)
            total = probs if total is None else total + probs
        n = total.shape[0]
        side = round(n**0.5)
        grid = total.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)  # (1, tokens, s, s)
        record = ctx.record
        assert record is not None
        target = record.blend_map
        if target is None:
            record.blend_map = grid.float()
        else:
            if grid.shape[-1] != target.shape[-1]:
                grid = F.interpolate(grid.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            record.blend_map = target + grid.float()
