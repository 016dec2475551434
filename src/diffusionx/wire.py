"""What crosses the network between edge and cloud: latents as safetensors bytes, never pickle."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import DiffusionXError, InvalidInputError

LATENT_KEY = "latents"
WIRE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# The largest |value| a latent on the wire may hold. A real image's SD-family latent lies within
# about +-50 (scaled ones within +-5; the untrained stand-in's previews reach ~46); 1000 leaves
# 20x headroom and stays far from where fp16 or fp32 arithmetic overflows into inf/NaN.
MAX_LATENT_ABS = 1000.0


class NonFiniteResultError(DiffusionXError):
    """A refinement produced NaN or infinite latents: a failure, never a result to show."""


class PayloadError(InvalidInputError):
    """A latent or image payload that cannot be refined. `code` says why, as the HTTP service's
    error code: `bad_base64`, `bad_payload` (not a readable safetensors file or PNG),
    `latent_mismatch` (not one fp16/fp32 tensor of a shape the model takes), `latent_out_of_range`,
    `image_size`."""

    def __init__(self, message: str, code: str = "bad_payload"):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (str(self), self.code)


def latent_value_problem(latents: torch.Tensor, limit: float = MAX_LATENT_ABS) -> str | None:
    """Why these latents are unusable (NaN, inf, or |value| above `limit`), or None if they are fine."""
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        return f"{bad} of {latents.numel()} values are NaN or infinite"
    peak = float(latents.abs().max()) if latents.numel() else 0.0
    if peak > limit:
        return f"the largest |value| is {peak:.3g}, above the limit of {limit:g} (real latents lie within about +-50)"
    return None


def check_latent_values(latents: torch.Tensor, what: str = "latents", limit: float = MAX_LATENT_ABS) -> torch.Tensor:
    """`latents` if finite and within +-`limit`; InvalidInputError saying what is wrong otherwise."""
    problem = latent_value_problem(latents, limit)
    if problem is not None:
        raise InvalidInputError(f"{what} are out of range: {problem}")
    return latents


def latents_to_bytes(latents: torch.Tensor, dtype: str = "fp16") -> bytes:
    """Serialize latents (fp16 by default: 4x64x64 -> 32 KiB) as a safetensors blob."""
    if dtype not in WIRE_DTYPES:
        raise InvalidInputError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    return save_safetensors({LATENT_KEY: latents.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()})


def read_latents(data: bytes) -> torch.Tensor:
    """Parse a safetensors blob holding one float tensor named 'latents'; the tensor as sent (fp16
    or fp32). PayloadError (`bad_payload`: unreadable; `latent_mismatch`: other tensors) otherwise."""
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises several types on hostile bytes
        raise PayloadError(
            f"latent payload is not a readable safetensors file ({err}); "
            "encode it with diffusionx.wire.latents_to_bytes"
        ) from None
    if set(tensors) != {LATENT_KEY}:
        raise PayloadError(
            f"latent payload must hold exactly one tensor named {LATENT_KEY!r}, got {sorted(tensors)}",
            "latent_mismatch",
        )
    latents = tensors[LATENT_KEY]
    if latents.dtype not in WIRE_DTYPES.values():
        raise PayloadError(f"latents must be fp16 or fp32, got {latents.dtype}", "latent_mismatch")
    return latents


def latents_from_bytes(data: bytes) -> torch.Tensor:
    """`read_latents` as float32."""
    return read_latents(data).float()


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_to_image(data: bytes, check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """A PNG's pixels as RGB. `check_size(width, height)` sees the size read from the header before
    any pixel is decoded (a small file may decode to gigapixels) and raises to refuse it.
    PayloadError (`bad_payload`: not a readable PNG; `image_size`: too many pixels) otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise PayloadError(f"image dimensions are far too large ({err})", "image_size") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PayloadError(f"image is not a readable PNG: {err}") from None
    with image:
        if image.format != "PNG":
            raise PayloadError(f"image must be a PNG, got {image.format}")
        if check_size is not None:
            check_size(image.width, image.height)
        try:
            image.load()
        except (OSError, ValueError) as err:
            raise PayloadError(f"image is not a readable PNG: {err}") from None
        return image.convert("RGB")
