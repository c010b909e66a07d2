"""VGG19 feature extractor (relu1_1 ... relu5_1) on torchvision's VGG19 layout.

The package ships the first five convolutions of torchvision's ImageNet VGG19
(conv1_1..conv3_1): everything matching, swapping and the texture loss need. Deeper layers
(relu4_1, relu5_1 for the perceptual loss) load from torchvision's full ImageNet weights
when the user has them (``weights="imagenet"`` looks in the torch hub cache, or pass a path).

NB: the layer stack is built here with torchvision's ``vgg19().features`` module indices
(configuration "E", no batch norm), so torchvision state dicts load, without importing
torchvision (about half a second of start-up).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .fuse import conv2d_relu

BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "vgg19_conv1_1-conv3_1.pth"
BUNDLED_SHA256 = "04beb56b51534cb5ba112840539948e89e8ee6664add21855957773ada6fe05b"
# torchvision's IMAGENET1K_V1 file name in the hub cache
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"

# Index of each ReLU in torchvision's vgg19().features.
RELU_INDEX = {
    "relu1_1": 1, "relu1_2": 3,
    "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu3_4": 17,
    "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
    "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35,
}
# The bundled file names torchvision's features.0/2/5/7/10 by their VGG names.
BUNDLED_KEYS = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10}
BUNDLED_DEPTH = RELU_INDEX["relu3_1"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"]


def _vgg19_layers(depth: int) -> nn.Sequential:
    """torchvision's ``vgg19().features[: depth + 1]`` (configuration "E", no batch norm), same indices."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _CFG_E:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
        if len(layers) > depth:
            break
    return nn.Sequential(*layers[: depth + 1])


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_bundled_state() -> dict[str, torch.Tensor]:
    """The shipped conv1_1..conv3_1 weights, as torchvision ``features.N.*`` keys."""
    digest = sha256_of(BUNDLED_WEIGHTS)
    if digest != BUNDLED_SHA256:
        raise RuntimeError(
            f"bundled VGG19 weights {BUNDLED_WEIGHTS} are corrupt: sha256 {digest}, "
            f"expected {BUNDLED_SHA256}; reinstall srntt-core"
        )
    raw = torch.load(BUNDLED_WEIGHTS, map_location="cpu", weights_only=True)
    return {f"{BUNDLED_KEYS[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in raw.items()}


def find_torchvision_weights() -> Path | None:
    """torchvision's full VGG19 ImageNet file in the hub cache, if the user has it."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    path = hub / TORCHVISION_FILE
    return path if path.is_file() else None


class VGG19Features(nn.Module):
    """Frozen VGG19 features at named ReLU layers.

    Args:
        layers: names from ``RELU_INDEX`` (default: the three SRNTT swap levels).
        weights: ``"bundled"`` (shipped conv1_1..conv3_1; layers up to relu3_1),
            ``"imagenet"`` (torchvision's full file from the hub cache), a path to a
            torchvision VGG19 state dict, or ``None`` (random init, for tests).
        input_range: ``(lo, hi)`` of the input images; they are mapped to [0, 1] and
            normalized with ImageNet mean/std (torchvision's convention).
        requires_grad: train the VGG weights (normally frozen).

    ``forward(x)`` returns a dict ``{layer: tensor}``; the stack stops at the deepest layer asked for.
    """

    def __init__(
        self,
        layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1"),
        weights: str | os.PathLike | None = "bundled",
        input_range: tuple[float, float] = (0.0, 1.0),
        requires_grad: bool = False,
    ):
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        unknown = [name for name in layers if name not in RELU_INDEX]
        if unknown or not layers:
            raise ValueError(
                f"layers: unknown VGG19 layer(s) {unknown or '[]'}; choose from {list(RELU_INDEX)}")
        self.layers = tuple(layers)
        depth = max(RELU_INDEX[name] for name in self.layers)
        self.features = _vgg19_layers(depth)
        if weights == "bundled":
            if depth > BUNDLED_DEPTH:
                deep = [n for n in self.layers if RELU_INDEX[n] > BUNDLED_DEPTH]
                raise ValueError(
                    f"weights: the bundled VGG19 weights stop at relu3_1; layers {deep} need "
                    f"torchvision's full VGG19 weights (weights='imagenet' or a path)"
                )
            state = load_bundled_state()
            self.features.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) <= depth})
        elif weights is not None:
            path = find_torchvision_weights() if weights == "imagenet" else Path(weights)
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(
                    f"weights: torchvision VGG19 weights not found ({weights!r}); put "
                    f"{TORCHVISION_FILE} in $TORCH_HOME/hub/checkpoints or pass its path"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            self.features.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) <= depth})
        lo, hi = input_range
        if not hi > lo:
            raise ValueError(f"input_range: need lo < hi, got {input_range}")
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # x01 = (x - lo) / (hi - lo); y = (x01 - mean) / std, folded into one affine map.
        self.register_buffer("scale", 1.0 / ((hi - lo) * std), persistent=False)
        self.register_buffer("shift", -(lo / (hi - lo) + mean) / std, persistent=False)
        self.requires_grad_(requires_grad)
        if not requires_grad:
            self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected an RGB batch (B, 3, H, W), got shape {tuple(x.shape)}")
        h = x * self.scale + self.shift
        wanted = {RELU_INDEX[name]: name for name in self.layers}
        out: dict[str, torch.Tensor] = {}
        layers = list(self.features)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
                h = conv2d_relu(layer, h)  # the ReLU's output, in one pass where oneDNN fuses them
            elif not isinstance(layer, nn.ReLU):
                h = layer(h)
            elif not isinstance(layers[i - 1], nn.Conv2d):
                # NB: torchvision's ReLUs are in-place; the outputs we keep must not be overwritten.
                h = torch.relu(h)
            if i in wanted:
                out[wanted[i]] = h
        return out
