"""The wire schema of the refinement API: one set of pydantic models for the server and the client.

The server validates `POST /v1/refine` bodies and documents its answers with them (routes.py);
the client (`diffusionx.client.CloudClient`) builds its requests and reads the answers with the
same models, so the two cannot drift apart. `RefineBody.from_request` / `to_request` and
`RefineResponse.from_result` / `to_result` are the only mapping between the in-process types
(`diffusionx.cloud.RefineRequest` / `RefineResult`) and the JSON on the wire.

This module imports pydantic (a base dependency) and nothing of a web framework, so the client
works without the server's packages.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..cloud import RefineRequest, RefineResult
from ..engine import DEFAULT_SCHEDULER, Timing
from ..wire import PayloadError

LATENT_MEDIA_TYPE = "application/vnd.diffusionx.latents+safetensors"
PNG_MEDIA_TYPE = "image/png"
IDEMPOTENCY_KEY_MAX = 200  # characters of an Idempotency-Key header


class RefineBody(BaseModel):
    """POST /v1/refine. Send exactly one of `latent` or `image`."""

    # strict: numbers are JSON numbers ("0.5" and true are refused, not coerced); integers for
    # steps and seed (an int is fine where a float is expected)
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="the final prompt")
    strength: float = Field(ge=0.0, le=1.0, description="SDEdit strength: 0 keeps the input, 1 starts fresh")
    steps: int = Field(20, ge=1, description="scheduler steps; the U-Net runs ceil(strength*steps) of them")
    seed: int = Field(0, ge=0, lt=2**63)
    guidance: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale (<=1: off)")
    scheduler: Literal["ddim", "dpm++", "euler"] = DEFAULT_SCHEDULER
    latent: str | None = Field(
        None, description="base64 of a safetensors file with one fp16/fp32 tensor 'latents', a size the model takes"
    )
    image: str | None = Field(None, description="base64 PNG at a size the model takes (when latents cannot be shared)")
    return_format: Literal["latent", "png"] = "latent"

    @classmethod
    def from_request(cls, request: RefineRequest) -> RefineBody:
        """The body that carries `request` (pydantic's ValidationError if a field does not fit)."""
        return cls(
            prompt=request.prompt,
            strength=float(request.strength),
            steps=int(request.steps),
            seed=int(request.seed),
            guidance=float(request.guidance_scale),
            scheduler=request.scheduler,
            latent=None if request.latents is None else base64.b64encode(request.latents).decode(),
            image=None if request.image_png is None else base64.b64encode(request.image_png).decode(),
            return_format=request.return_format,
        )

    def to_request(self) -> RefineRequest:
        """The request this body carries, its payload decoded from base64 (PayloadError
        `bad_base64` if it is not); the payload itself is checked by `cloud.check_request`."""
        return RefineRequest(
            prompt=self.prompt,
            strength=self.strength,
            steps=self.steps,
            seed=self.seed,
            guidance_scale=self.guidance,
            scheduler=self.scheduler,
            latents=_b64(self.latent, "latent"),
            image_png=_b64(self.image, "image"),
            return_format=self.return_format,
        )


class Timings(BaseModel):
    queue_s: float
    text_encode_s: float
    vae_encode_s: float
    unet_s: float
    decode_s: float
    total_s: float


class Cost(BaseModel):
    unet_steps: int
    unet_calls: int
    unet_compute_s: float


class RefineResponse(BaseModel):
    request_id: str
    return_format: Literal["latent", "png"]
    media_type: str
    payload: str = Field(description="base64 of the safetensors latents or the PNG")
    strength: float
    steps: int
    unet_steps: int
    timings: Timings
    cost: Cost
    largest_batch: int
    replica: str
    seq: int

    @classmethod
    def from_result(cls, result: RefineResult, request_id: str, replica: str) -> RefineResponse:
        t = result.timing
        return cls(
            request_id=request_id,
            return_format=result.return_format,
            media_type=PNG_MEDIA_TYPE if result.return_format == "png" else LATENT_MEDIA_TYPE,
            payload=base64.b64encode(result.payload).decode(),
            strength=result.strength,
            steps=result.steps,
            unet_steps=result.unet_steps,
            timings=Timings(
                queue_s=result.queue_s,
                text_encode_s=t.text_encode_s,
                vae_encode_s=t.vae_encode_s,
                unet_s=t.unet_s,
                decode_s=t.decode_s,
                total_s=result.queue_s + t.total_s,
            ),
            cost=Cost(unet_steps=result.unet_steps, unet_calls=t.unet_calls, unet_compute_s=t.unet_compute_s),
            largest_batch=getattr(result, "largest_batch", 1),
            replica=replica,
            seq=getattr(result, "seq", 0),
        )

    def to_result(self) -> RefineResult:
        """The result this answer carries (ValueError if its payload is not base64)."""
        timings, cost = self.timings, self.cost
        timing = Timing(
            text_encode_s=timings.text_encode_s,
            vae_encode_s=timings.vae_encode_s,
            unet_s=timings.unet_s,
            unet_compute_s=cost.unet_compute_s,
            decode_s=timings.decode_s,
            unet_calls=cost.unet_calls,
        )
        return RefineResult(
            payload=base64.b64decode(self.payload, validate=True),
            return_format=self.return_format,
            strength=self.strength,
            steps=self.steps,
            unet_steps=self.unet_steps,
            timing=timing,
            queue_s=timings.queue_s,
        )


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """Every error's JSON: {"error": {"status", "code", "message"}}."""
    return ErrorResponse(error=ErrorBody(status=status, code=code, message=message)).model_dump()


def _b64(text: str | None, field: str) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"'{field}' is not valid base64 (standard alphabet, padded)", "bad_base64") from None
