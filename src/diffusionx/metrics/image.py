"""Pixel metrics between two images: PSNR and SSIM, over the whole image or a mask of it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def as_uint8(image: Any) -> np.ndarray:
    """A PIL image or an (H, W, 3) array as uint8 (H, W, 3)."""
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)


def psnr(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """PSNR in dB over the pixels of `mask` (all when None); inf for identical pixels."""
    diff = (as_uint8(a).astype(np.float64) - as_uint8(b).astype(np.float64)) ** 2
    mse = diff[mask].mean() if mask is not None else diff.mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim_map(a: Any, b: Any, window: int = 7) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004; a uniform window, as scikit-image's default), averaged
    over the channels."""
    x = torch.from_numpy(as_uint8(a).astype(np.float64)).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(as_uint8(b).astype(np.float64)).permute(2, 0, 1)[:, None]
    kernel = torch.full((1, 1, window, window), 1.0 / window**2, dtype=torch.float64)
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), kernel)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=0)[0].numpy()


def ssim(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    s = ssim_map(a, b)
    return float(s[mask].mean() if mask is not None else s.mean())


def mean_ci95(values: list) -> tuple[float | None, list[float] | None]:
    """Mean and normal 95% interval of the finite values (None when there are none / fewer than 2)."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return mean, None
    half = 1.96 * float(np.std(finite, ddof=1)) / np.sqrt(len(finite))
    return mean, [mean - half, mean + half]
