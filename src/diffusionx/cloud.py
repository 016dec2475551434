"""Cloud refinement: the large model re-noises the final preview latent and denoises it.

`CloudRefiner` is the in-process refiner. Requests carry what would cross the network (latents
as fp16 safetensors bytes, or a PNG when edge and cloud do not share a latent space), so the
byte counts are real and the HTTP service can wrap this class unchanged.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image, UnidentifiedImageError

from .engine import DEFAULT_SCHEDULER, DenoiseJob, Engine, Timing, check_seed, check_steps, check_strength
from .errors import InvalidInputError
from .wire import (
    NonFiniteResultError,
    check_latent_values,
    image_to_png,
    latent_value_problem,
    latents_from_bytes,
    latents_to_bytes,
)

MAX_PROMPT_CHARS = 2000


@dataclass
class RefineRequest:
    prompt: str
    strength: float
    steps: int = 20
    seed: int = 0
    guidance_scale: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    latents: bytes | None = None  # safetensors, fp16 or fp32
    image_png: bytes | None = None
    return_format: Literal["latent", "png"] = "latent"

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInputError("prompt is empty: send the final prompt to refine")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidInputError(f"prompt is {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        check_strength(self.strength)
        check_steps(self.steps)
        check_seed(self.seed)
        if (self.latents is None) == (self.image_png is None):
            raise InvalidInputError("send exactly one of latents (safetensors) or image (PNG)")
        if self.return_format not in ("latent", "png"):
            raise InvalidInputError(f"return format must be 'latent' or 'png', got {self.return_format!r}")

    @property
    def upload_bytes(self) -> int:
        payload = self.latents if self.latents is not None else self.image_png
        return len(payload) + len(self.prompt.encode())


@dataclass
class RefineResult:
    payload: bytes  # safetensors latents or PNG, per the request's return_format
    return_format: str
    strength: float
    steps: int
    unet_steps: int
    timing: Timing = field(default_factory=Timing)
    queue_s: float = 0.0

    @property
    def cloud_seconds(self) -> float:
        return self.queue_s + self.timing.total_s


class Refiner(Protocol):
    """Anything that refines: the in-process CloudRefiner or the HTTP client."""

    def refine(self, request: RefineRequest) -> RefineResult: ...


@dataclass
class RefineJob:
    """A refinement in flight: the engine's job and what its result must say."""

    request: RefineRequest
    job: DenoiseJob
    vae_encode_s: float = 0.0


class CloudRefiner:
    """The refine contract, in two halves so that many refinements can share U-Net calls:
    `prepare(request) -> RefineJob` (validate, read the payload, start the job), `Engine.run` on
    the jobs, `finish(job) -> RefineResult` (check and encode the result). `refine` is the three
    in a row; the batching server runs the same halves around its step loop."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def prepare(self, request: RefineRequest) -> RefineJob:
        request.validate()
        vae_encode_s = 0.0
        if request.latents is not None:
            latents = self.engine.check_latents(check_latent_values(latents_from_bytes(request.latents), "the latents"))
        else:
            start = time.perf_counter()
            latents = self.engine.encode_image(_read_png(request.image_png))
            vae_encode_s = time.perf_counter() - start
        job = self.engine.prepare(
            request.prompt,
            seed=request.seed,
            steps=request.steps,
            strength=request.strength,
            init_latents=latents,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            height=latents.shape[-2] * self.engine.vae_scale_factor,
            width=latents.shape[-1] * self.engine.vae_scale_factor,
        )
        return RefineJob(request, job, vae_encode_s)

    def finish(self, refine_job: RefineJob) -> RefineResult:
        request = refine_job.request
        generation = self.engine.finish(refine_job.job, decode=request.return_format == "png")
        generation.timing.vae_encode_s = refine_job.vae_encode_s
        problem = latent_value_problem(generation.latents)
        if problem is not None:  # never hand back (or decode) NaN as if it were a refinement
            raise NonFiniteResultError(f"the refinement produced unusable latents: {problem}")
        if request.return_format == "png":
            payload = image_to_png(generation.image)
        else:
            payload = latents_to_bytes(generation.latents)
        return RefineResult(
            payload=payload,
            return_format=request.return_format,
            strength=request.strength,
            steps=request.steps,
            unet_steps=generation.unet_steps,
            timing=generation.timing,
        )

    def refine(self, request: RefineRequest) -> RefineResult:
        refine_job = self.prepare(request)
        self.engine.run([refine_job.job])
        return self.finish(refine_job)

    def refine_all(self, requests: list[RefineRequest], batch: int = 32) -> list[RefineResult]:
        """Many refinements, `batch` sharing each U-Net call (the benchmark's and the collector's way)."""
        jobs = [self.prepare(request) for request in requests]
        self.engine.run([j.job for j in jobs], batch=batch)
        return [self.finish(j) for j in jobs]


def _read_png(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInputError(f"image is not a readable PNG: {err}") from None
    return image.convert("RGB")
