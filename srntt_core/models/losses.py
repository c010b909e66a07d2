"""SRNTT losses (Zhang et al., CVPR 2019, Sec. 3.3): reconstruction, perceptual, adversarial (WGAN-GP),
texture.

Images are in [-1, 1] (the network's range); the VGG-based losses map them to [0, 1] internally.

Perceptual loss fallback: the paper uses relu5_1, whose weights are not shipped. When
torchvision's full VGG19 file cannot be found, :class:`PerceptualLoss` warns and uses relu3_1
of the bundled weights instead (``layer_used`` says which one is active).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..swap import LEVELS
from .vgg import VGG19Features

PERCEPTUAL_FALLBACK = "relu3_1"


def reconstruction_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """L1(SR, HR)."""
    return F.l1_loss(sr, hr)


class PerceptualLoss(nn.Module):
    """MSE between VGG19 features of SR and HR (both in [-1, 1]).

    ``layer="relu5_1"`` (paper) needs torchvision's full VGG19 ImageNet weights
    (``weights="imagenet"`` looks in the torch hub cache, or give a path). If they are
    missing and ``fallback=True``, a warning is issued and relu3_1 with the bundled
    weights is used instead; ``fallback=False`` raises.
    """

    def __init__(self, layer: str = "relu5_1", weights: str | None = "imagenet", fallback: bool = True):
        super().__init__()
        try:
            self.vgg = VGG19Features((layer,), weights=weights, input_range=(-1.0, 1.0))
            self.layer_used = layer
        except (FileNotFoundError, ValueError) as e:
            if not fallback:
                raise
            warnings.warn(
                f"perceptual loss: {layer} weights unavailable ({e}); FALLING BACK to "
                f"{PERCEPTUAL_FALLBACK} with the bundled VGG19 weights (not the paper's relu5_1)",
                RuntimeWarning, stacklevel=2,
            )
            self.vgg = VGG19Features((PERCEPTUAL_FALLBACK,), weights="bundled", input_range=(-1.0, 1.0))
            self.layer_used = PERCEPTUAL_FALLBACK

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.vgg(hr)[self.layer_used]
        return F.mse_loss(self.vgg(sr)[self.layer_used], target)


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F^T F per sample, F: (H*W, C) -> (B, C, C)."""
    b, c = features.shape[:2]
    f = features.reshape(b, c, -1)
    return f @ f.transpose(1, 2)


def texture_loss(
    sr_features: Mapping[str, torch.Tensor],
    swapped: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None = None,
    levels: tuple[str, ...] = tuple(LEVELS),
) -> torch.Tensor:
    """Gram-matrix texture loss between VGG features of SR and the swapped maps M_l.

    term_l = mean((G(phi_l(SR)) - G(M_l))^2) / (4 (H_l W_l C_l)^2); result: mean over levels.
    With ``weights`` (B, 1, H_l, W_l) per level, phi_l(SR) and M_l are multiplied by them first
    (see :func:`texture_weights` for the similarity-to-weight mapping).
    """
    terms = []
    for level in levels:
        phi, m = sr_features[level], swapped[level]
        if phi.shape != m.shape:
            raise ValueError(
                f"texture_loss[{level}]: SR features {tuple(phi.shape)} vs swapped {tuple(m.shape)}"
            )
        if weights is not None:
            w = weights[level]
            phi, m = phi * w, m * w
        _, c, h, w_ = phi.shape
        norm = 4.0 * float(h * w_ * c) ** 2
        terms.append(((gram(phi) - gram(m)) ** 2).mean() / norm)
    return torch.stack(terms).mean()


def texture_weights(score_map: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """Similarity S -> texture-loss weight. ``"paper"``: S itself; ``"code"``: the original
    code's ``sigmoid(-20 S + 0.65)`` (chosen empirically by the authors)."""
    if mode == "paper":
        return score_map
    if mode == "code":
        return torch.sigmoid(-20.0 * score_map + 0.65)
    raise ValueError(f"mode: expected 'paper' or 'code', got {mode!r}")


def critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss E[D(fake)] - E[D(real)] (add the gradient penalty)."""
    return d_fake.mean() - d_real.mean()


def generator_adversarial_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(fake)]."""
    return -d_fake.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: ``weight * E[(||grad D(x_hat)||_2 - 1)^2]`` on random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    d = critic(x_hat)
    (grad,) = torch.autograd.grad(d.sum(), x_hat, create_graph=True)
    return weight * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


LOSS_WEIGHTS = {"rec": 1.0, "per": 1e-4, "adv": 1e-6, "tex": 1e-4}
