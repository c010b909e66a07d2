"""PSNR / SSIM on Y (BT.601, [16, 235]), 4-pixel shave, 11x11 Gaussian sigma 1.5."""

import math

import numpy as np
import pytest
import torch

from srntt_core.models.metrics import gaussian_window, psnr_y, rgb_to_y, ssim_y


def test_rgb_to_y_range_and_weights():
    assert rgb_to_y(torch.zeros(3, 2, 2)).unique().item() == pytest.approx(16.0)
    assert rgb_to_y(torch.ones(3, 2, 2)).unique().item() == pytest.approx(235.0, abs=1e-9)
    red = torch.zeros(3, 1, 1)
    red[0] = 1
    assert rgb_to_y(red).item() == pytest.approx(16 + 65.481)
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y(torch.zeros(4, 2, 2))


def test_psnr_known_value_and_shave():
    hr = torch.full((3, 20, 20), 0.5)
    sr = hr.clone()
    sr[:, 4:-4, 4:-4] += 10 / 219  # Y differs by 10 * (65.481+128.553+24.966)/219 = 10 inside the shave
    want = 10 * math.log10(255 ** 2 / 100)
    assert psnr_y(sr, hr) == pytest.approx(want, abs=1e-6)
    border = hr.clone()
    border[:, :4] = 0  # only the shaved border differs
    assert psnr_y(border, hr) == math.inf
    assert psnr_y(border, hr, shave=0) < 40
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(sr, hr[:, :-1])
    with pytest.raises(ValueError, match="too small"):
        psnr_y(hr[:, :8, :8], hr[:, :8, :8])


def test_psnr_batch_is_mean_of_images():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 24, 24, generator=g), torch.rand(2, 3, 24, 24, generator=g)
    assert psnr_y(a, b) == pytest.approx((psnr_y(a[0], b[0]) + psnr_y(a[1], b[1])) / 2)


def _ssim_numpy(x, y):
    """Direct per-window SSIM (Wang et al. 2004) with an 11x11 Gaussian, valid windows."""
    w = gaussian_window().numpy()[0, 0]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_definition():
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(3, 25, 23, generator=g)
    sr = (hr + 0.1 * torch.randn(3, 25, 23, generator=g)).clamp(0, 1)
    want = _ssim_numpy(rgb_to_y(sr)[0, 4:-4, 4:-4].numpy(), rgb_to_y(hr)[0, 4:-4, 4:-4].numpy())
    assert ssim_y(sr, hr) == pytest.approx(want, abs=1e-10)
    assert ssim_y(hr, hr) == pytest.approx(1.0)
    assert gaussian_window().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="SSIM window"):
        ssim_y(hr[:, :16, :16], hr[:, :16, :16])
