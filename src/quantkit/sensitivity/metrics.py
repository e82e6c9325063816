"""Error metrics shared by the stages and the tests: SQNR, PSNR, SSIM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sqnr", "psnr", "ssim", "MAX_DB"]

MAX_DB = 120.0  # reported for an exact match (JSON has no infinity)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((test - ref)^2))``."""
    ref = reference.detach().to(torch.float64)
    noise = (test.detach().to(torch.float64) - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return MAX_DB
    if signal == 0:
        return -MAX_DB
    return min(MAX_DB, 10.0 * math.log10(signal / noise))


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, data_range]``."""
    mse = (reference.detach().to(torch.float64) - test.detach().to(torch.float64)).pow(2).mean().item()
    return MAX_DB if mse == 0 else min(MAX_DB, 10.0 * math.log10(data_range**2 / mse))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) of images ``[N, C, H, W]`` or ``[H, W, C]``.

    The window shrinks to the image size for small images (the built-in model makes 32x32 images).
    """
    a, b = reference.detach().to(torch.float64), test.detach().to(torch.float64)
    if a.dim() == 3:  # HWC -> 1CHW
        a, b = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    c = a.shape[1]
    win = min(win_size, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2  # odd
    g = _gaussian(win, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()

    def blur(x):
        return F.conv2d(x, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean().item())
