"""SRNTT generator, WGAN-GP critic and losses (Zhang et al., CVPR 2019, Sec. 3.2-3.3; the authors' code)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from srntt_core.models import losses as L
from srntt_core.models.discriminator import Discriminator
from srntt_core.models.srntt import SRNTT, bicubic_x4


def count_parameters(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _maps(b, h, w, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {
        "relu3_1": torch.rand(b, 256, h, w, generator=g, dtype=dtype),
        "relu2_1": torch.rand(b, 128, 2 * h, 2 * w, generator=g, dtype=dtype),
        "relu1_1": torch.rand(b, 64, 4 * h, 4 * w, generator=g, dtype=dtype),
    }


def test_parameter_count_matches_paper():
    g = SRNTT()
    total = count_parameters(g)
    assert abs(total - 4.38e6) / 4.38e6 < 0.005, total
    assert abs(count_parameters(g.content_extractor) - 1.52e6) / 1.52e6 < 0.005
    assert abs(count_parameters(g.texture_transfer) - 2.87e6) / 2.87e6 < 0.005
    # the residual option adds no parameters
    assert count_parameters(SRNTT(residual="bicubic")) == total


@pytest.mark.parametrize("h,w", [(5, 7), (8, 3)])
def test_generator_shapes_odd_sizes(h, w):
    g = SRNTT(ch=16, content_blocks=1, transfer_blocks=(1, 1, 1)).eval()
    lr = torch.rand(2, 3, h, w) * 2 - 1
    with torch.no_grad():
        sr = g(lr, _maps(2, h, w))
    assert sr.shape == (2, 3, 4 * h, 4 * w)
    assert sr.abs().max() <= 1.0  # tanh output


def test_full_size_generator_forward_backward():
    g = SRNTT()
    lr = torch.rand(1, 3, 6, 5) * 2 - 1
    sr = g(lr, _maps(1, 6, 5))
    sr.mean().backward()
    assert g.texture_transfer.small_in[0].weight.grad is not None


def test_residual_mode_starts_at_bicubic():
    g = SRNTT(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1), residual="bicubic").eval()
    lr = torch.rand(1, 3, 7, 9) * 2 - 1
    with torch.no_grad():
        sr = g(lr, _maps(1, 7, 9))
    torch.testing.assert_close(sr, bicubic_x4(lr))


def test_generator_rejects_bad_maps():
    g = SRNTT(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1))
    maps = _maps(1, 4, 4)
    with pytest.raises(ValueError, match="relu2_1"):
        g(torch.rand(1, 3, 4, 4), {**maps, "relu2_1": maps["relu2_1"][..., :7, :]})
    with pytest.raises(ValueError, match="missing level"):
        g(torch.rand(1, 3, 4, 4), {"relu3_1": maps["relu3_1"]})
    with pytest.raises(ValueError, match="residual"):
        SRNTT(residual="nearest")


def test_discriminator():
    d = Discriminator(160)
    n = count_parameters(d)
    assert abs(n - 17.8e6) / 17.8e6 < 0.01, n
    out = d(torch.rand(2, 3, 160, 160) * 2 - 1)
    assert out.shape == (2,)
    small = Discriminator(32)
    assert small(torch.rand(3, 3, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match="expected"):
        small(torch.rand(1, 3, 64, 64))


def test_texture_loss_matches_formula_float64():
    g = torch.Generator().manual_seed(1)
    sr = {k: torch.rand(2, c, s, s + 1, generator=g, dtype=torch.float64)
          for k, c, s in (("relu3_1", 5, 3), ("relu2_1", 4, 6), ("relu1_1", 3, 12))}
    m = {k: torch.rand_like(v) for k, v in sr.items()}
    terms = []
    for k in sr:
        b, c, h, w = sr[k].shape
        fs = sr[k].reshape(b, c, h * w).transpose(1, 2)  # F: (H*W, C)
        fm = m[k].reshape(b, c, h * w).transpose(1, 2)
        gs, gm = fs.transpose(1, 2) @ fs, fm.transpose(1, 2) @ fm
        terms.append(((gs - gm) ** 2).mean() / (4 * (h * w * c) ** 2))
    want = sum(terms) / 3
    torch.testing.assert_close(L.texture_loss(sr, m), want)
    ones = {k: torch.ones(v.shape[0], 1, *v.shape[-2:], dtype=torch.float64) for k, v in sr.items()}
    torch.testing.assert_close(L.texture_loss(sr, m, ones), want)
    half = {k: v * 0.5 for k, v in ones.items()}
    # G scales with w^2, so the squared difference with w^4
    torch.testing.assert_close(L.texture_loss(sr, m, half), want / 16)
    assert L.texture_loss(sr, sr) == 0


def test_texture_weights_modes():
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(L.texture_weights(s, "paper"), s)
    torch.testing.assert_close(L.texture_weights(s, "code"), torch.sigmoid(-20 * s + 0.65))
    with pytest.raises(ValueError):
        L.texture_weights(s, "other")


def test_reconstruction_and_adversarial_losses():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert L.reconstruction_loss(a, b).item() == pytest.approx(0.5)
    assert L.generator_adversarial_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    assert L.critic_loss(torch.tensor([2.0]), torch.tensor([1.0])).item() == -1.0


def test_gradient_penalty_on_linear_critic():
    # D(x) = <w, x>: the gradient norm is |w| everywhere, so GP = 10 * (|w| - 1)^2.
    w = torch.randn(3 * 4 * 4, dtype=torch.float64)

    def critic(x):
        return x.flatten(1) @ w

    real = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    fake = torch.rand(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    gp = L.gradient_penalty(critic, real, fake)
    torch.testing.assert_close(gp, 10 * (w.norm() - 1) ** 2)
    d = Discriminator(32)
    gp = L.gradient_penalty(d, torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    gp.backward()
    assert d.features[0].weight.grad is not None and gp.item() >= 0


def test_perceptual_loss_falls_back_loudly(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision weights there
    with pytest.warns(RuntimeWarning, match="FALLING BACK to relu3_1"):
        loss = L.PerceptualLoss("relu5_1", "imagenet")
    assert loss.layer_used == "relu3_1"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert loss(x, x).item() == 0
    y = (x + 0.3).clamp(-1, 1).requires_grad_(True)
    out = loss(y, x)
    out.backward()
    assert out.item() > 0 and y.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError):
            L.PerceptualLoss("relu5_1", "imagenet", fallback=False)


def test_bicubic_x4_is_torch_bicubic():
    x = torch.rand(1, 3, 5, 6)
    want = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_x4(x), want)
