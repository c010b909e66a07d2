"""PSNR and SSIM on the Y channel (docs/CONTRACT.md §10).

Y is ITU-R BT.601 luma on the [16, 235] range (as MATLAB's ``rgb2ycbcr``):
``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1]. A ``shave``-pixel border
(default 4, the scale) is removed before measuring. SSIM follows Wang et al. 2004: 11x11
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering, mean of the map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BT601 = (65.481, 128.553, 24.966)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 1, H, W) Y in [16, 235] (float64)."""
    if x.shape[-3] != 3:
        raise ValueError(f"x: expected 3 channels (RGB) at dim -3, got shape {tuple(x.shape)}")
    x = x.double()
    w = torch.tensor(BT601, dtype=torch.float64, device=x.device).view(3, 1, 1)
    return 16.0 + (x * w).sum(dim=-3, keepdim=True)


def _prepare(sr: torch.Tensor, hr: torch.Tensor, shave: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.dim() == 3:
        sr, hr = sr[None], hr[None]
    if sr.dim() != 4:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got shape {tuple(sr.shape)}")
    ys, yh = rgb_to_y(sr.clamp(0, 1)), rgb_to_y(hr.clamp(0, 1))
    if shave:
        if min(ys.shape[-2:]) <= 2 * shave:
            raise ValueError(f"image {tuple(ys.shape[-2:])} is too small for a {shave}-pixel shave")
        ys, yh = ys[..., shave:-shave, shave:-shave], yh[..., shave:-shave, shave:-shave]
    return ys, yh


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, shave: int = 4) -> float:
    """PSNR (dB) on Y, peak 255, after shaving; mean over a batch. Inf for identical images."""
    ys, yh = _prepare(sr, hr, shave)
    mse = ((ys - yh) ** 2).flatten(1).mean(1)
    vals = [math.inf if m == 0 else 10 * math.log10(255.0 ** 2 / float(m)) for m in mse]
    return sum(vals) / len(vals)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, shave: int = 4, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM on Y (Wang et al. 2004), mean over the valid map and the batch."""
    ys, yh = _prepare(sr, hr, shave)
    if min(ys.shape[-2:]) < window:
        raise ValueError(
            f"image {tuple(ys.shape[-2:])} (after shave) is smaller than the {window}px SSIM window"
        )
    w = gaussian_window(window, sigma).to(ys.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = F.conv2d(ys, w), F.conv2d(yh, w)
    s11 = F.conv2d(ys * ys, w) - mu1 ** 2
    s22 = F.conv2d(yh * yh, w) - mu2 ** 2
    s12 = F.conv2d(ys * yh, w) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.flatten(1).mean(1).mean())
