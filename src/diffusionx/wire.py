"""What crosses the network between edge and cloud: latents as safetensors bytes, never pickle."""

from __future__ import annotations

import io

import torch
from PIL import Image
from safetensors import SafetensorError
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


def latents_from_bytes(data: bytes) -> torch.Tensor:
    """Parse a safetensors blob holding one float tensor named 'latents'; returns float32."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"latent payload is not a valid safetensors file: {err}") from None
    if set(tensors) != {LATENT_KEY}:
        raise InvalidInputError(
            f"latent payload must hold exactly one tensor named {LATENT_KEY!r}, got {sorted(tensors)}"
        )
    latents = tensors[LATENT_KEY]
    if latents.dtype not in WIRE_DTYPES.values():
        raise InvalidInputError(f"latents must be fp16 or fp32, got {latents.dtype}")
    return latents.float()


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
