"""The SRNTT generator: content extractor + texture transfer (Zhang et al., CVPR 2019, Sec. 3.2,
and the authors' code).

Conventions of the original code: 3x3 convs, stride 1, same padding, weights N(0, 0.02),
BatchNorm (momentum 0.1, eps 1e-5; a conv followed by BN has no bias), ReLU, residual block
RB = conv-BN-ReLU-conv-BN + identity. Images are in [-1, 1].

The content extractor is the SRGAN-style generator of the original (its x4 upsampling tail
included, so it can be pretrained as a single-image SR network on its own); the texture
transfer network only reads its 64-channel LR-size feature map ``C``. Together:
content extractor 1.52 M + texture transfer 2.87 M = 4.38 M trainable parameters.

``residual="bicubic"`` is NOT in the original: the output is ``bicubic_x4(LR) + f(...)``
(no tanh, last layer initialized to zero, so an untrained network returns bicubic). It makes
training converge far faster on small budgets; ``residual=None`` is the original network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..swap import LEVELS, UPSCALE

# Channels of the swapped VGG maps, per swap level (srntt_core.swap.LEVELS).
SWAP_CHANNELS = {"relu3_1": 256, "relu2_1": 128, "relu1_1": 64}
RESIDUAL_MODES = (None, "bicubic")
# Bounds on the configuration (the paper's network: ch 64, blocks 16 / (16, 8, 4)). They keep a
# configuration read from a file from asking for an absurd network: at the bounds, ~150 M parameters.
MAX_CH = 256
MAX_BLOCKS = 32


def _bounded_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")
    return value


def validate_config(config) -> dict:
    """Check an SRNTT configuration (a dict of ``SRNTT(...)`` arguments) and return the arguments.

    Types and ranges are checked before anything is built: ``ch`` in [2, MAX_CH],
    ``content_blocks`` in [0, MAX_BLOCKS], ``transfer_blocks`` three integers in [0, MAX_BLOCKS],
    ``residual`` one of RESIDUAL_MODES. Raises TypeError / ValueError naming the field.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of SRNTT arguments, got {type(config).__name__}")
    known = ("ch", "content_blocks", "transfer_blocks", "residual")
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        raise ValueError(f"config: unknown field(s) {unknown}; known: {list(known)}")
    out = {}
    if "ch" in config:
        out["ch"] = _bounded_int("ch", config["ch"], 2, MAX_CH)
    if "content_blocks" in config:
        out["content_blocks"] = _bounded_int("content_blocks", config["content_blocks"], 0, MAX_BLOCKS)
    if "transfer_blocks" in config:
        tb = config["transfer_blocks"]
        if not isinstance(tb, (list, tuple)) or len(tb) != 3:
            raise ValueError(f"transfer_blocks: expected three integers, got {tb!r}")
        out["transfer_blocks"] = tuple(_bounded_int(f"transfer_blocks[{i}]", v, 0, MAX_BLOCKS)
                                       for i, v in enumerate(tb))
    if "residual" in config:
        if config["residual"] not in RESIDUAL_MODES:
            raise ValueError(f"residual: expected one of {RESIDUAL_MODES}, got {config['residual']!r}")
        out["residual"] = config["residual"]
    return out


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=bias)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights, zero biases, BN scale 1 / shift 0 (the original code's initializers).

    A module on the meta device (a shape-only skeleton, as checkpoint loading builds) is left
    alone: it holds no values, and torch's meta ``normal_`` runs through its Python decompositions,
    which import torch._dynamo (~1.5 s of ``srntt sr`` start-up).
    """
    if any(p.is_meta for p in module.parameters()):
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + identity."""

    def __init__(self, ch: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(ch, ch, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
            conv3x3(ch, ch, bias=False), nn.BatchNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _trunk(ch: int, n_blocks: int) -> nn.Sequential:
    """``n_blocks`` residual blocks then conv + BN (the long skip is added by the caller)."""
    blocks = [ResBlock(ch) for _ in range(n_blocks)]
    return nn.Sequential(*blocks, conv3x3(ch, ch, bias=False), nn.BatchNorm2d(ch))


def _upsample_x2(ch: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(ch, 4 * ch), nn.PixelShuffle(2), nn.ReLU(inplace=True))


class ContentExtractor(nn.Module):
    """SRGAN-style generator; ``forward`` returns the content feature map C (64 ch, LR size).

    ``tail`` is the SRGAN x4 tail of the original's content extractor (two x2 pixel-shuffle
    stages, 1x1 conv). Ref-SR never runs it; its weights stay so that the generator has the
    published layout and parameter count (4.38 M) and every checkpoint keeps its keys.
    """

    def __init__(self, ch: int = 64, n_blocks: int = 16):
        super().__init__()
        self.head = nn.Sequential(conv3x3(3, ch), nn.ReLU(inplace=True))
        self.trunk = _trunk(ch, n_blocks)
        self.tail = nn.Sequential(_upsample_x2(ch), _upsample_x2(ch), nn.Conv2d(ch, 3, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.head(x)
        return x0 + self.trunk(x0)


class TextureTransfer(nn.Module):
    """Fuses C with the swapped maps M3 (LR), M2 (x2), M1 (x4) and decodes the x4 image."""

    def __init__(self, ch: int = 64, blocks: tuple[int, int, int] = (16, 8, 4)):
        super().__init__()
        c3, c2, c1 = (SWAP_CHANNELS[k] for k in LEVELS)
        self.small_in = nn.Sequential(conv3x3(ch + c3, ch), nn.ReLU(inplace=True))
        self.small_trunk = _trunk(ch, blocks[0])
        self.small_up = _upsample_x2(ch)
        self.medium_in = nn.Sequential(conv3x3(ch + c2, ch), nn.ReLU(inplace=True))
        self.medium_trunk = _trunk(ch, blocks[1])
        self.medium_up = _upsample_x2(ch)
        self.large_in = nn.Sequential(conv3x3(ch + c1, ch), nn.ReLU(inplace=True))
        self.large_trunk = _trunk(ch, blocks[2])
        self.out = nn.Sequential(conv3x3(ch, ch // 2), nn.Conv2d(ch // 2, 3, kernel_size=1))

    def forward(self, content: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns the pre-activation output (B, 3, 4h, 4w)."""
        m3, m2, m1 = (maps[k] for k in LEVELS)
        x = self.small_in(torch.cat([content, m3], 1))
        psi1 = self.small_up(content + self.small_trunk(x))
        x = self.medium_in(torch.cat([psi1, m2], 1))
        psi2 = self.medium_up(psi1 + self.medium_trunk(x))
        x = self.large_in(torch.cat([psi2, m1], 1))
        return self.out(psi2 + self.large_trunk(x))


class SRNTT(nn.Module):
    """SRNTT generator (x4).

    Args:
        ch: feature width (64 in the paper).
        content_blocks: residual blocks of the content extractor (16).
        transfer_blocks: residual blocks at LR, x2, x4 in the texture transfer (16, 8, 4).
        residual: ``None`` (original: ``tanh(out)``) or ``"bicubic"`` (documented addition:
            ``bicubic_x4(LR) + out``, last layer zero-initialized).

    ``forward(lr, maps)``: ``lr`` (B, 3, h, w) in [-1, 1]; ``maps`` the swapped VGG maps
    ``{"relu3_1": (B,256,h,w), "relu2_1": (B,128,2h,2w), "relu1_1": (B,64,4h,4w)}`` (as
    returned by ``srntt_core.swap.texture_swap``). Returns SR (B, 3, 4h, 4w) in [-1, 1]
    (``residual="bicubic"`` may overshoot slightly; clamp for display).
    """

    scale = UPSCALE

    def __init__(
        self,
        ch: int = 64,
        content_blocks: int = 16,
        transfer_blocks: tuple[int, int, int] = (16, 8, 4),
        residual: str | None = None,
    ):
        super().__init__()
        validate_config({"ch": ch, "content_blocks": content_blocks, "transfer_blocks": transfer_blocks,
                         "residual": residual})
        self.config = {
            "ch": ch, "content_blocks": content_blocks,
            "transfer_blocks": list(transfer_blocks), "residual": residual,
        }
        self.residual = residual
        self.content_extractor = ContentExtractor(ch, content_blocks)
        self.texture_transfer = TextureTransfer(ch, tuple(transfer_blocks))
        init_weights(self)
        if residual == "bicubic" and not self.texture_transfer.out[-1].weight.is_meta:
            last = self.texture_transfer.out[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def check_inputs(self, lr: torch.Tensor, maps: dict[str, torch.Tensor]) -> None:
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr: expected (B, 3, h, w), got shape {tuple(lr.shape)}")
        b, _, h, w = lr.shape
        for k, f in LEVELS.items():
            if k not in maps:
                raise ValueError(f"maps: missing level {k!r} (have {sorted(maps)})")
            want = (b, SWAP_CHANNELS[k], h * f, w * f)
            if tuple(maps[k].shape) != want:
                raise ValueError(f"maps[{k!r}]: expected shape {want}, got {tuple(maps[k].shape)}")

    def forward(self, lr: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_inputs(lr, maps)
        out = self.texture_transfer(self.content_extractor(lr), maps)
        if self.residual == "bicubic":
            return bicubic_x4(lr) + out
        return torch.tanh(out)


def bicubic_x4(x: torch.Tensor) -> torch.Tensor:
    """Bicubic x4 (torch's kernel, a = -0.75, half-pixel centres)."""
    return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
