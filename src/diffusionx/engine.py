"""The one denoising loop. Edge previews, cloud refinement and the benchmarks all run through it.

A generation is a `DenoiseJob`: its own latents, prompt embeddings, guidance scale and its own
scheduler instance (multistep solvers keep per-sample history). `Engine.step(jobs)` advances every
job by one step with a *single* U-Net call whose timestep tensor holds each sample's own timestep,
so requests at different strengths share a batch; the cloud's continuous batching builds on that.

Strength follows SDEdit: `strength` in [0, 1] of an img2img request denoises the last
`ceil(strength * steps)` of the `steps` scheduler timesteps, starting from the input latent noised
to the first of them. Strength 0 returns the input latent untouched (no U-Net call); strength 1 is
plain text-to-image from the seed's noise. For every strength where `strength * steps` is an
integer this is exactly diffusers' StableDiffusionImg2ImgPipeline (tests use it as the oracle);
where it is not, diffusers rounds down (and runs zero steps at small strengths), we round up.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image
from tqdm.auto import tqdm

from .errors import InvalidInputError, OutOfVocabularyWarning, PromptTruncatedWarning

SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}
DEFAULT_SCHEDULER = "ddim"
MAX_STEPS = 1000


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler of kind `name` with the model's noise schedule (betas, spacing...)."""
    if name not in SCHEDULERS:
        raise InvalidInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config({**dict(base_config), **overrides})


class _SchedulerFactory:
    """`make_scheduler` for one model's config, as copies of one built scheduler: `from_config`
    inspects the class's signature on every call (2.6 ms, a third of preparing a refinement)."""

    def __init__(self, base_config: dict[str, Any]):
        self.base_config = base_config
        self._built: dict[str, Any] = {}

    def __call__(self, name: str):
        if name not in self._built:
            self._built[name] = make_scheduler(name, self.base_config)
        return copy.deepcopy(self._built[name])


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise InvalidInputError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strength must be in [0, 1] (0 keeps the input, 1 starts fresh), got {strength}")
    return float(strength)


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInputError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    return int(steps)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def steps_for_strength(strength: float, steps: int) -> int:
    """U-Net steps an SDEdit request runs: ceil(strength * steps), at least 1 when strength > 0."""
    strength, steps = check_strength(strength), check_steps(steps)
    if strength == 0.0:
        return 0
    # The epsilon keeps 0.3 * 10 = 3.0000000000000004 at 3 steps rather than 4.
    return min(steps, max(1, math.ceil(strength * steps - 1e-9)))


@dataclass
class PromptEmbeddings:
    cond: torch.Tensor  # (1, tokens, dim)
    uncond: torch.Tensor | None  # None when guidance is off
    truncated: bool = False
    unknown_words: tuple[str, ...] = ()  # words a world-only model never saw (see Engine.world_vocabulary)


@dataclass
class Timing:
    """Seconds spent per stage. `unet_s` is the wall time of the U-Net calls this job was part of;
    `unet_compute_s` is its share of them (by batch rows), i.e. what it cost the machine."""

    text_encode_s: float = 0.0
    vae_encode_s: float = 0.0
    unet_s: float = 0.0
    unet_compute_s: float = 0.0
    decode_s: float = 0.0
    unet_calls: int = 0

    @property
    def total_s(self) -> float:
        return self.text_encode_s + self.vae_encode_s + self.unet_s + self.decode_s

    def as_dict(self) -> dict[str, float]:
        return {
            "text_encode_s": self.text_encode_s,
            "vae_encode_s": self.vae_encode_s,
            "unet_s": self.unet_s,
            "unet_compute_s": self.unet_compute_s,
            "decode_s": self.decode_s,
            "unet_calls": self.unet_calls,
            "total_s": self.total_s,
        }


class AttentionHook(Protocol):
    """Hook point for attention control (Prompt-to-Prompt). The engine installs it on the U-Net
    for the job's run only, tells it which step comes next (`on_step`, before the U-Net call) and
    when that step's scheduler update is done (`after_step`: e.g. a local blend of the latents).
    A hooked job never shares its U-Net call with other jobs, so the control cannot leak into
    someone else's image."""

    def install(self, unet: torch.nn.Module) -> None: ...

    def remove(self, unet: torch.nn.Module) -> None: ...

    def on_step(self, step_index: int, num_steps: int, timestep: int) -> None: ...

    def after_step(self, step_index: int, num_steps: int) -> None: ...


@dataclass
class KeptRegion:
    """A local edit's region outside the mask: after every step it is reset to the input latent
    noised to the next timestep with the job's own noise (the input itself after the last), so
    the picture there ends exactly as it was. The blend of diffusers' StableDiffusionInpaintPipeline
    with a plain 4-channel U-Net (Blended Latent Diffusion)."""

    mask: torch.Tensor  # (1 or n, 1, h, w) in [0, 1]: 1 regenerates, 0 keeps `reference`
    reference: torch.Tensor  # the input latents
    noise: torch.Tensor  # the noise the job started from
    free_steps: int = 0  # steps run on the whole picture before the blend begins (its layout forms)

    def blend(self, latents: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, next_index: int) -> torch.Tensor:
        if next_index <= self.free_steps and next_index < len(timesteps):
            return latents
        kept = self.reference
        if next_index < len(timesteps):
            kept = scheduler.add_noise(self.reference, self.noise, timesteps[next_index : next_index + 1])
        return torch.lerp(kept, latents, self.mask)  # exact at 0 and 1 (lerp's two-sided formula)


@dataclass
class DenoiseJob:
    latents: torch.Tensor  # (n, C, h, w), usually n=1; replaced step by step
    embeddings: PromptEmbeddings  # cond / uncond with n rows to match
    guidance_scale: float
    scheduler: Any
    timesteps: torch.Tensor  # the timesteps this job still walks, in order
    hook: AttentionHook | None = None
    kept: KeptRegion | None = None  # a local edit: the part of the input that must not change
    step_index: int = 0
    timing: Timing = field(default_factory=Timing)
    seed: int = 0  # what `Engine.finish` reports; set by `start`
    steps: int = 0  # the schedule length asked for
    strength: float = 1.0

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def uses_guidance(self) -> bool:
        return self.embeddings.uncond is not None


@dataclass
class Generation:
    latents: torch.Tensor
    image: Image.Image
    seed: int
    steps: int  # the schedule length asked for
    strength: float
    unet_steps: int  # U-Net steps actually run: steps_for_strength(strength, steps)
    timing: Timing
    prompt_truncated: bool = False
    unknown_words: tuple[str, ...] = ()  # outside a world model's vocabulary (Engine.unknown_words)
    preview_decoded: bool = False  # `image` came from the tiny preview decoder, not the VAE


@lru_cache(maxsize=1)
def _world_vocab() -> frozenset[str]:
    from importlib import resources

    path = resources.files("diffusionx") / "assets" / "tokenizer" / "vocab.json"
    return frozenset(json.loads(path.read_text(encoding="utf-8")))


def uses_world_tokenizer(tokenizer: Any) -> bool:
    """True for the embedded world's tokenizer (the shipped, trained and untrained pairs)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, TypeError):
        return False
    return len(vocab) == len(_world_vocab()) and frozenset(vocab) == _world_vocab()


class Engine:
    """One model (text encoder + U-Net + VAE + noise schedule) and the denoising loop around it."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any], name: str = "",
                 preview_vae=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # A tiny decoder (diffusers' AutoencoderTiny, TAESD-style) for previews; finals keep the VAE.
        self.preview_vae = preview_vae
        self.scheduler_config = dict(scheduler_config)
        self.new_scheduler = _SchedulerFactory(self.scheduler_config)
        self.name = name
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._embedding_cache: OrderedDict[tuple[str, str, bool], PromptEmbeddings] = OrderedDict()
        # Models with the embedded world's tokenizer know only its words; hub models know language.
        self.world_vocabulary = uses_world_tokenizer(tokenizer)
        self._warned_words: set[str] = set()
        for module in (unet, vae, text_encoder, preview_vae):
            if module is not None:
                module.eval().requires_grad_(False)

    @classmethod
    def from_pipeline(cls, pipe, name: str = "") -> Engine:
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler_config=pipe.scheduler.config,
            name=name,
        )

    # ----- shapes -------------------------------------------------------------------------
    # The U-Net's first parameter, not diffusers' `ModelMixin.device`/`.dtype`: those walk every
    # submodule looking for offloading hooks (2 ms a call, four calls per refinement prepared).
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: VAE downsampling x U-Net downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        height, width = self.check_size(height, width)
        channels = self.unet.config.in_channels
        return (1, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        m = self.size_multiple
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidInputError(f"{label} must be an integer number of pixels, got {value!r}")
            if value < m or value % m:
                raise InvalidInputError(
                    f"{label} must be a positive multiple of {m} for model {self.name or 'this model'} "
                    f"(its default is {self.default_size}), got {value}"
                )
            if value > 8 * self.default_size:
                raise InvalidInputError(f"{label} {value} is more than 8x this model's size {self.default_size}")
        return int(height), int(width)

    def check_latents(self, latents: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
        expected = self.latent_shape(height, width)
        if not isinstance(latents, torch.Tensor):
            raise InvalidInputError(f"latents must be a torch tensor of shape {expected}, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if tuple(latents.shape) != expected:
            raise InvalidInputError(
                f"latents have shape {tuple(latents.shape)}, but model {self.name} at this size needs {expected}"
            )
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise InvalidInputError("latents must be finite floating-point values")
        return latents.to(self.device, self.dtype)

    # ----- text ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, negative_prompt: str = "", guidance: bool = True) -> PromptEmbeddings:
        """Same tokenization and encoding as diffusers' StableDiffusionPipeline.encode_prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt is empty: type what the image should show")
        key = (prompt, negative_prompt, guidance)
        if key in self._embedding_cache:
            self._embedding_cache.move_to_end(key)
            return self._embedding_cache[key]
        cond, truncated = self._encode_text(prompt, warn=True)
        uncond = self._encode_text(negative_prompt)[0] if guidance else None
        embeddings = PromptEmbeddings(cond, uncond, truncated, self.unknown_words(prompt, warn=True))
        self._embedding_cache[key] = embeddings
        if len(self._embedding_cache) > 64:
            self._embedding_cache.popitem(last=False)
        return embeddings

    def unknown_words(self, prompt: str, warn: bool = False) -> tuple[str, ...]:
        """Words of `prompt` this model never saw: those outside the embedded world's vocabulary
        for a world model, none for a hub model. With `warn`, each new word is warned about once."""
        if not self.world_vocabulary:
            return ()
        from .world.captions import unknown_words

        words = tuple(unknown_words(prompt))
        new = [w for w in words if w not in self._warned_words]
        if warn and new:
            self._warned_words.update(new)
            warnings.warn(
                f"the embedded models know only their synthetic world's words; unknown here: {', '.join(new)}. "
                "The image will not follow them: `diffusionx vocab` lists the words and example prompts.",
                OutOfVocabularyWarning,
                stacklevel=3,
            )
        return words

    def _encode_text(self, text: str, warn: bool = False) -> tuple[torch.Tensor, bool]:
        tok = self.tokenizer
        max_length = tok.model_max_length
        ids = tok(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        full = tok(text, padding="longest", return_tensors="pt").input_ids
        truncated = full.shape[-1] > max_length
        if truncated and warn:
            removed = tok.batch_decode(full[:, max_length - 1 : -1])[0]
            warnings.warn(
                f"prompt is {full.shape[-1]} tokens but the text encoder reads at most {max_length}; "
                f"this part was cut and ignored: {removed!r}. Shorten the prompt to keep it.",
                PromptTruncatedWarning,
                stacklevel=3,
            )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            mask = mask.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.text_encoder(ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype), truncated

    # ----- the loop -----------------------------------------------------------------------
    def start(
        self,
        embeddings: PromptEmbeddings,
        *,
        seed: int,
        steps: int = 20,
        strength: float = 1.0,
        init_latents: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        scheduler: str = DEFAULT_SCHEDULER,
        height: int | None = None,
        width: int | None = None,
        hook: AttentionHook | None = None,
        edit_mask: torch.Tensor | None = None,
        free_steps: int = 0,
    ) -> DenoiseJob:
        """Prepare a job: noise the input latent to the strength's first timestep (or draw fresh
        noise for strength 1 / no input) exactly as diffusers' pipelines do for the same seed.

        `edit_mask` ((1, 1, h, w) at latent size, 1 = regenerate) makes it a local edit of
        `init_latents`: outside the mask the input is kept (`KeptRegion`), at any strength; the
        first `free_steps` steps run on the whole picture before the blend begins (the last step
        always blends, so the outside still ends as the input)."""
        seed, steps, strength = check_seed(seed), check_steps(steps), check_strength(strength)
        if not isinstance(guidance_scale, (int, float)) or not 0.0 <= guidance_scale <= 50.0:
            raise InvalidInputError(f"guidance_scale must be a number in [0, 50], got {guidance_scale!r}")
        if init_latents is None and strength < 1.0:
            raise InvalidInputError("strength < 1 needs input latents to start from (SDEdit)")
        shape = self.latent_shape(height, width)
        if init_latents is not None:
            init_latents = self.check_latents(init_latents, height, width)
        if edit_mask is not None:
            edit_mask = self._check_mask(edit_mask, init_latents, shape)
        if (guidance_scale > 1.0) != (embeddings.uncond is not None):
            raise InvalidInputError("embeddings were encoded for a different guidance setting")

        sched = self.new_scheduler(scheduler)
        sched.set_timesteps(steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(seed)
        n_run = steps_for_strength(strength, steps)
        noise = None
        if strength == 1.0:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
            latents = noise * sched.init_noise_sigma
            timesteps = sched.timesteps
        elif n_run == 0:
            latents, timesteps = init_latents.clone(), sched.timesteps[:0]
        else:
            begin = (steps - n_run) * sched.order
            timesteps = sched.timesteps[begin:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(begin)
            noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
            latents = sched.add_noise(init_latents, noise, timesteps[:1])
        kept = None
        if edit_mask is not None and noise is not None:
            kept = KeptRegion(edit_mask, init_latents, noise, free_steps=max(0, int(free_steps)))
        return DenoiseJob(latents, embeddings, float(guidance_scale), sched, timesteps, hook=hook, kept=kept,
                          seed=seed, steps=steps, strength=strength)

    def _check_mask(self, mask: Any, init_latents: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        if init_latents is None:
            raise InvalidInputError("a local edit (edit_mask) needs the input latents it keeps outside the mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 \
                or tuple(mask.shape[-2:]) != tuple(shape[-2:]):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidInputError(f"edit_mask must be a (1, 1, {shape[-2]}, {shape[-1]}) tensor at latent size, "
                                    f"got {got}")
        mask = mask.to(self.device, self.dtype)
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise InvalidInputError("edit_mask values must be in [0, 1] (1 = regenerate, 0 = keep)")
        return mask

    @torch.no_grad()
    def step(self, jobs: list[DenoiseJob]) -> None:
        """Advance every unfinished job by one step, all in one U-Net call (per-sample timesteps)."""
        active = [job for job in jobs if not job.done]
        if not active:
            return
        if len(active) > 1 and any(job.hook for job in active):
            raise ValueError("a job with an attention hook must run alone (see AttentionHook)")
        # Rows in the order diffusers uses for one sample: every unconditional row, then every
        # conditional one, so a batch of one is bit-for-bit the pipeline's own call.
        rows = [(job, "uncond") for job in active if job.uses_guidance] + [(job, "cond") for job in active]
        samples, timesteps, context = [], [], []
        for job, kind in rows:
            t = job.timesteps[job.step_index]
            samples.append(job.scheduler.scale_model_input(job.latents, t))
            timesteps.append(t.reshape(1).expand(job.latents.shape[0]))
            context.append(job.embeddings.uncond if kind == "uncond" else job.embeddings.cond)
        start = time.perf_counter()
        out = self.unet(
            torch.cat(samples), torch.cat(timesteps), encoder_hidden_states=torch.cat(context), return_dict=False
        )[0]
        elapsed = time.perf_counter() - start
        predictions: dict[int, dict[str, torch.Tensor]] = {}
        # A job may carry several samples (e.g. Prompt-to-Prompt's source and edit branches).
        for (job, kind), prediction in zip(rows, out.split([sample.shape[0] for sample in samples])):
            predictions.setdefault(id(job), {})[kind] = prediction
        for job in active:
            pred = predictions[id(job)]
            noise = pred["cond"]
            if job.uses_guidance:
                noise = pred["uncond"] + job.guidance_scale * (pred["cond"] - pred["uncond"])
            t = job.timesteps[job.step_index]
            job.latents = job.scheduler.step(noise, t, job.latents, return_dict=False)[0]
            job.step_index += 1
            if job.kept is not None:
                job.latents = job.kept.blend(job.latents, job.scheduler, job.timesteps, job.step_index)
            job.timing.unet_s += elapsed
            job_rows = job.latents.shape[0] * (2 if job.uses_guidance else 1)
            job.timing.unet_compute_s += elapsed * job_rows / sum(sample.shape[0] for sample in samples)
            job.timing.unet_calls += 1

    def run(self, jobs: list[DenoiseJob], progress: bool = False, desc: str | None = None,
            batch: int | None = None) -> None:
        """Run jobs to the end: unhooked ones batched together (at most `batch` per U-Net call),
        hooked ones one at a time."""
        plain = [job for job in jobs if job.hook is None]
        size = batch or len(plain) or 1
        groups = [plain[k : k + size] for k in range(0, len(plain), size)]
        groups += [[job] for job in jobs if job.hook is not None]
        total = sum(job.num_steps - job.step_index for job in jobs)
        with tqdm(total=total, desc=desc or f"{self.name} denoise", disable=not progress, leave=False) as bar:
            for group in groups:
                hook = group[0].hook
                if hook is not None:
                    hook.install(self.unet)
                try:
                    while not all(job.done for job in group):
                        if hook is not None:
                            job = group[0]
                            hook.on_step(job.step_index, job.num_steps, int(job.timesteps[job.step_index]))
                        before = sum(job.step_index for job in group)
                        self.step(group)
                        if hook is not None:
                            hook.after_step(group[0].step_index - 1, group[0].num_steps)
                        bar.update(sum(job.step_index for job in group) - before)
                finally:
                    if hook is not None:
                        hook.remove(self.unet)

    # ----- VAE ----------------------------------------------------------------------------
    def uses_preview_decoder(self, preview: bool) -> bool:
        """Whether a decode asked for as a `preview` goes through the tiny preview decoder."""
        return preview and self.preview_vae is not None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, preview: bool = False) -> list[Image.Image]:
        """Latents -> PIL images, the same post-processing as diffusers' VaeImageProcessor;
        `preview` decodes with the tiny preview decoder when the engine has one."""
        vae = self.preview_vae if self.uses_preview_decoder(preview) else self.vae
        config = vae.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [Image.fromarray(image) for image in (pixels * 255).round().astype("uint8")]

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> latents (the posterior mean: deterministic, no seed involved)."""
        if not isinstance(image, Image.Image):
            raise InvalidInputError(f"image must be a PIL image, got {type(image).__name__}")
        self.check_size(image.height, image.width)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        config = self.vae.config
        if getattr(config, "shift_factor", None):
            latents = latents - config.shift_factor
        return (latents * config.scaling_factor).to(self.dtype)

    # ----- a generation in two halves: prepare a job, run it (batched with others), finish it
    def prepare(
        self,
        prompt: str,
        *,
        seed: int,
        steps: int = 20,
        strength: float = 1.0,
        init_latents: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        scheduler: str = DEFAULT_SCHEDULER,
        height: int | None = None,
        width: int | None = None,
        hook: AttentionHook | None = None,
        edit_mask: torch.Tensor | None = None,
        free_steps: int = 0,
    ) -> DenoiseJob:
        """Encode the prompt and start the job `generate` would run (its text-encode time recorded)."""
        timing = Timing()
        start = time.perf_counter()
        embeddings = self.encode_prompt(prompt, negative_prompt, guidance=guidance_scale > 1.0)
        timing.text_encode_s = time.perf_counter() - start
        job = self.start(embeddings, seed=seed, steps=steps, strength=strength, init_latents=init_latents,
                         guidance_scale=guidance_scale, scheduler=scheduler, height=height, width=width, hook=hook,
                         edit_mask=edit_mask, free_steps=free_steps)
        job.timing = timing
        return job

    def finish(self, job: DenoiseJob, decode: bool = True, preview: bool = False) -> Generation:
        """The `Generation` of a job that ran to the end (decoded unless `decode` is False; by the
        preview decoder, where the engine has one, when `preview`)."""
        return self.finish_all([job], decode=decode, preview=preview)[0]

    def finish_all(self, jobs: list[DenoiseJob], decode: bool = True, batch: int = 64,
                   preview: bool = False) -> list[Generation]:
        """`finish` for many jobs, decoded `batch` at a time (each is charged its share)."""
        if not all(job.done for job in jobs):
            raise ValueError("finish() needs jobs that ran to the end (Engine.run)")
        images: list[Image.Image | None] = [None] * len(jobs)
        if decode:
            for k in range(0, len(jobs), batch):
                chunk = jobs[k : k + batch]
                start = time.perf_counter()
                decoded = self.decode(torch.cat([job.latents for job in chunk]), preview=preview)
                share = (time.perf_counter() - start) / len(chunk)
                for j, (job, image) in enumerate(zip(chunk, decoded)):
                    job.timing.decode_s = share
                    images[k + j] = image
        return [
            Generation(latents=job.latents, image=image, seed=job.seed, steps=job.steps, strength=job.strength,
                       unet_steps=job.num_steps, timing=job.timing, prompt_truncated=job.embeddings.truncated,
                       unknown_words=job.embeddings.unknown_words,
                       preview_decoded=decode and self.uses_preview_decoder(preview))
            for job, image in zip(jobs, images)
        ]

    # ----- one call -----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        seed: int,
        steps: int = 20,
        strength: float = 1.0,
        init_latents: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        scheduler: str = DEFAULT_SCHEDULER,
        height: int | None = None,
        width: int | None = None,
        hook: AttentionHook | None = None,
        decode: bool = True,
        progress: bool = False,
        edit_mask: torch.Tensor | None = None,
        free_steps: int = 0,
        preview: bool = False,
    ) -> Generation:
        """Text-to-image (strength 1) or SDEdit from `init_latents` (strength < 1), with timings;
        with `edit_mask`, a local edit that keeps `init_latents` outside the mask."""
        job = self.prepare(prompt, seed=seed, steps=steps, strength=strength, init_latents=init_latents,
                           guidance_scale=guidance_scale, negative_prompt=negative_prompt, scheduler=scheduler,
                           height=height, width=width, hook=hook, edit_mask=edit_mask, free_steps=free_steps)
        self.run([job], progress=progress)
        return self.finish(job, decode=decode, preview=preview)
