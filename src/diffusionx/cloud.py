"""Cloud refinement: the large model re-noises the final preview latent and denoises it.

`CloudRefiner` is the in-process refiner and the one refine contract: `check(request)` (what
needs no model call), `prepare(request) -> RefineJob`, `Engine.run` (or `Engine.step`) on the jobs,
`finish(job) -> RefineResult`. The HTTP service's continuous batcher (`server/batching.py`) runs
the same halves around its step loop, so a request gets the same bytes in process and over HTTP.
Requests carry what would cross the network (latents as fp16 safetensors bytes, or a PNG when
edge and cloud do not share a latent space), so the byte counts are real.

What the contract answers: latents in the wire format's default precision (fp16, whatever the
request's was), PNGs at the request's size; it takes any size the engine takes (sides that are
multiples of `Engine.size_multiple`, up to 8x the model's own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from PIL import Image

from .engine import DEFAULT_SCHEDULER, DenoiseJob, Engine, Generation, Timing, check_seed, check_steps, check_strength
from .errors import InvalidInputError
from .wire import (
    MAX_LATENT_ABS,
    NonFiniteResultError,
    PayloadError,
    image_to_png,
    latent_value_problem,
    latents_to_bytes,
    png_to_image,
    read_latents,
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
    # the payload parsed, once: (the bytes it was parsed from, the tensor or image)
    _parsed: tuple[bytes, Any] | None = field(default=None, init=False, repr=False, compare=False)

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

    # The payload is parsed once per request: validation, the idempotency fingerprint and the
    # refinement all read the same tensor (or image).
    def parsed_latents(self) -> torch.Tensor:
        """The latents as sent (fp16 or fp32); PayloadError if they are not readable."""
        if self.latents is None:
            raise InvalidInputError("this request carries an image, not latents")
        return self._parse(self.latents, read_latents)

    def parsed_image(self, check_size: Callable[[int, int], None] | None = None) -> Image.Image:
        """The image as RGB; `check_size(width, height)` judges its size before it is decoded."""
        if self.image_png is None:
            raise InvalidInputError("this request carries latents, not an image")
        image = self._parse(self.image_png, lambda data: png_to_image(data, check_size))
        if check_size is not None:
            check_size(image.width, image.height)  # (again, if it was decoded without this check)
        return image

    def _parse(self, data: bytes, parse: Callable[[bytes], Any]) -> Any:
        if self._parsed is None or self._parsed[0] is not data:
            self._parsed = (data, parse(data))
        return self._parsed[1]


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


def check_request(request: RefineRequest, engine: Engine | None = None) -> None:
    """Everything about a request that needs no model call: its fields, its payload (parsed once,
    see `RefineRequest.parsed_latents`), the latents' values and, given the `engine`, the size.
    InvalidInputError; PayloadError (with its code) for the payload."""
    request.validate()
    if request.latents is not None:
        latents = request.parsed_latents()
        problem = latent_value_problem(latents)
        if problem is not None:
            raise PayloadError(
                f"the latents are unusable: {problem}; send finite latents within +-{MAX_LATENT_ABS:g}",
                "latent_out_of_range",
            )
        if engine is not None:
            fit_latents(engine, latents)
    else:
        request.parsed_image(None if engine is None else lambda width, height: _check_image_size(engine, width, height))


def fit_latents(engine: Engine, latents: torch.Tensor) -> torch.Tensor:
    """`latents` on the engine's device and dtype, at whatever size they are if the engine takes
    it; PayloadError `latent_mismatch` otherwise."""
    shape = tuple(latents.shape)
    if latents.ndim not in (3, 4):
        raise PayloadError(
            f"latents have shape {shape}; model {engine.name} needs {engine.latent_shape()}", "latent_mismatch"
        )
    height, width = shape[-2] * engine.vae_scale_factor, shape[-1] * engine.vae_scale_factor
    if not _size_ok(engine, width, height):
        raise PayloadError(
            f"latents have shape {shape}, {width}x{height} pixels; {_sizes_text(engine)} "
            f"(latents of shape {engine.latent_shape()})",
            "latent_mismatch",
        )
    try:
        return engine.check_latents(latents, height, width)
    except InvalidInputError as err:
        raise PayloadError(str(err), "latent_mismatch") from None


def _check_image_size(engine: Engine, width: int, height: int) -> None:
    if not _size_ok(engine, width, height):
        raise PayloadError(f"image is {width}x{height} pixels; {_sizes_text(engine)}", "image_size")


def _size_ok(engine: Engine, width: int, height: int) -> bool:
    try:
        engine.check_size(height, width)
    except InvalidInputError:
        return False
    return True


def _sizes_text(engine: Engine) -> str:
    size, multiple = engine.default_size, engine.size_multiple
    return (
        f"model {engine.name or 'the cloud model'} takes sides that are multiples of {multiple} up to {8 * size} "
        f"pixels ({size}x{size} is its own size)"
    )


def result_problem(result: RefineResult) -> str | None:
    """Why a result that came from elsewhere (over HTTP, or from a refiner outside this contract)
    cannot be shown: an unreadable payload, or unusable latents; None if it is fine."""
    try:
        if result.return_format == "png":
            png_to_image(result.payload)
            return None
        problem = latent_value_problem(read_latents(result.payload))
    except InvalidInputError as err:
        return f"an unreadable payload ({err})"
    return None if problem is None else f"unusable latents: {problem}"


class CloudRefiner:
    """The refine contract, in two halves so that many refinements can share U-Net calls:
    `prepare(request) -> RefineJob` (check, read the payload, start the job), `Engine.run` (or
    `Engine.step`) on the jobs, `finish(job) -> RefineResult` (check and encode the result).
    `refine` is the three in a row; the batching server runs the same halves around its step loop."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def check(self, request: RefineRequest) -> None:
        """`check_request` against this engine: what `prepare` refuses, without a model call."""
        check_request(request, self.engine)

    def prepare(self, request: RefineRequest) -> RefineJob:
        self.check(request)
        vae_encode_s = 0.0
        if request.latents is not None:
            latents = request.parsed_latents()
        else:
            start = time.perf_counter()
            latents = self.engine.encode_image(request.parsed_image())
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
        (outcome,) = self.finish_each([refine_job])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def finish_each(self, refine_jobs: list[RefineJob]) -> list[RefineResult | Exception]:
        """`finish` for jobs that ran to the end together, each answered on its own: a result, or
        the exception that is its failure alone (NonFiniteResultError for NaN, infinite or absurd
        latents: never handed back nor decoded). The PNG ones are decoded together, one VAE call
        per latent shape."""
        outcomes: list[RefineResult | Exception | None] = [None] * len(refine_jobs)
        to_decode: dict[tuple[int, ...], list[int]] = {}
        for i, refine_job in enumerate(refine_jobs):
            problem = latent_value_problem(refine_job.job.latents)
            if problem is not None:
                outcomes[i] = NonFiniteResultError(f"the refinement produced unusable latents: {problem}")
            elif refine_job.request.return_format == "png":
                to_decode.setdefault(tuple(refine_job.job.latents.shape), []).append(i)
        generations: dict[int, Generation] = {}
        for group in to_decode.values():
            try:
                decoded = self.engine.finish_all([refine_jobs[i].job for i in group], decode=True)
            except Exception as err:
                for i in group:
                    outcomes[i] = err
                continue
            generations.update(zip(group, decoded))
        for i, refine_job in enumerate(refine_jobs):
            if outcomes[i] is None:
                try:
                    outcomes[i] = self._result(refine_job, generations.get(i))
                except Exception as err:
                    outcomes[i] = err
        return outcomes  # type: ignore[return-value]

    def _result(self, refine_job: RefineJob, generation: Generation | None) -> RefineResult:
        request = refine_job.request
        if generation is None:
            generation = self.engine.finish(refine_job.job, decode=False)
        generation.timing.vae_encode_s = refine_job.vae_encode_s
        if request.return_format == "png":
            payload = image_to_png(generation.image)
        else:
            payload = latents_to_bytes(generation.latents)  # the wire format's default: fp16
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
        results = []
        for outcome in self.finish_each(jobs):
            if isinstance(outcome, Exception):
                raise outcome
            results.append(outcome)
        return results
