"""What crosses the network between edge and cloud: latents as safetensors bytes, never pickle."""

from __future__ import annotations

import io

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import InvalidInputError

LATENT_KEY = "latents"
WIRE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


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
