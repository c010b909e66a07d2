"""WGAN-GP critic of SRNTT (the authors' code; Zhang et al., CVPR 2019, Sec. 3.3):
5 blocks of (conv s1, conv s2) + BN + LeakyReLU(0.2),
flatten, FC 1024 + LeakyReLU(0.2), FC 1 (a critic score, no sigmoid). ~17.8 M parameters at 160x160.
"""

from __future__ import annotations

import torch
from torch import nn

from .srntt import init_weights


class Discriminator(nn.Module):
    """Critic for (B, 3, input_size, input_size) images in [-1, 1].

    Args:
        input_size: training crop size (160 in the paper); must be divisible by 32.
        base: channels of the first block (doubles per block: 32 .. 512).
    """

    def __init__(self, input_size: int = 160, base: int = 32, n_blocks: int = 5):
        super().__init__()
        if input_size % (2 ** n_blocks):
            raise ValueError(f"input_size: must be divisible by {2 ** n_blocks}, got {input_size}")
        self.input_size = input_size
        layers: list[nn.Module] = []
        cin = 3
        for i in range(n_blocks):
            c = base * 2 ** i
            for stride in (1, 2):
                layers += [nn.Conv2d(cin, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                           nn.LeakyReLU(0.2, inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** n_blocks
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * side * side, 1024), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(1024, 1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"x: expected (B, 3, {self.input_size}, {self.input_size}), got shape {tuple(x.shape)}"
            )
        return self.classifier(self.features(x)).squeeze(1)
