"""SRNTT-compatible multi-layer texture swap on srntt-core's O(N)-memory kernels.

Drop-in for SRNTT's ``Swap.conditional_swap_multi_layer`` (``SRNTT/swap.py``, TensorFlow, numpy
HWC arrays) and for srntt-pytorch's ``Swapper`` (``models/swapper.py``). The published swap:

- matches 3x3 patches of the content (LR↑ relu3_1) against the condition (Ref↓↑ relu3_1) on the
  valid grid (no padding), with only the condition patches normalized: ``conv2d(content,
  patch / |patch|)`` and a running argmax, the index counted over the concatenated reference grids;
- copies the matched patches of the style (unblurred Ref) at relu3_1 (3x3, stride 1) and of each
  other layer at ``ratio`` times the size (3r x 3r windows at stride r), sums them and divides each
  pixel by the number of patches that cover it;
- with ``is_weight`` returns the cosine of the best pair (both sides normalized) on the valid grid,
  which the model pads by 1 with edge replication and resizes bicubically (x2, x4) into weight maps.

Here the argmax and the cosine come from :func:`srntt_core.swap.patch_match` (same argmax: the
content norm is one positive factor per query patch) and the swap from
:func:`srntt_core.swap.feature_swap` with ``reduce="mean"``. The ``N_content x N_ref`` correlation
of the weight step is never formed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..swap import LEVELS, feature_swap, patch_match
from ._pairs import chosen_key_norms, patch_norms, renormalized, result_dtype

__all__ = ["SRNTTSwap", "Swap", "Swapper", "srntt_swap", "srntt_weight_maps", "tf_resize_bicubic"]

LAYERS = tuple(LEVELS)  # relu3_1, relu2_1, relu1_1


class SRNTTSwap(NamedTuple):
    """``maps``: swapped maps, first the matching layer then each other layer; ``weights``: (B, Gh, Gw)
    best cosine or ``None``; ``index``: (B, Gh, Gw) int64 over the concatenated reference grids."""

    maps: list[Tensor]
    weights: Tensor | None
    index: Tensor


def _as_list(name: str, x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x:
        return list(x)
    raise TypeError(f"{name}: expected a tensor or a non-empty list of tensors, got {type(x).__name__}")


def srntt_swap(
    content: Tensor,
    style: Tensor | Sequence[Tensor],
    condition: Tensor | Sequence[Tensor],
    other_styles: Sequence[Tensor | Sequence[Tensor]] | None = None,
    *,
    patch_size: int = 3,
    stride: int = 1,
    is_weight: bool = False,
    norm_eps: float | None = None,
    ratios: Sequence[int] | None = None,
    backend: str = "auto",
    precision: str = "highest",
) -> SRNTTSwap:
    """SRNTT's ``conditional_swap_multi_layer`` on (B, C, H, W) tensors.

    Args:
        content: (B, C, H, W) features to match (LR↑ relu3_1).
        style: reference features at the matching layer (Ref relu3_1), one tensor per reference.
        condition: the same-shape maps to match against (Ref↓↑ relu3_1), one per reference.
        other_styles: for each further layer, its reference maps (one per reference), each an integer
            ``ratio`` times the size of ``style`` (relu2_1: 2, relu1_1: 4).
        stride: must be 1: SRNTT places patch (i, j) at pixel (i, j) whatever the stride.
        is_weight: also return the best cosine (SRNTT's ``weights``).
        norm_eps: ``None`` for SRNTT (patch norms used as they are), ``1e-5`` for srntt-pytorch
            (both patches divided by their norm + 1e-5 in the weights).
        ratios: the scale of each of ``other_styles`` relative to ``style``. ``None`` (SRNTT):
            inferred, and the heights must be exact multiples (SRNTT asserts it). Given
            (srntt-pytorch's fixed 2, 4): a map may have up to ``ratio - 1`` extra rows and columns
            (a 42-pixel reference: relu3_1 10, relu2_1 21, relu1_1 42), which are never read.

    Returns:
        :class:`SRNTTSwap` ``(maps, weights, index)``; ``maps[0]`` has content's size, ``maps[1 + l]``
        is ``ratio_l`` times larger. ``maps`` are differentiable with respect to the style maps,
        ``weights`` with respect to content and condition.
    """
    if stride != 1:
        raise ValueError(f"stride: only stride=1 is supported (SRNTT's swap places patch (i, j) at pixel "
                         f"(i, j) regardless of stride), got {stride}")
    styles = _as_list("style", style)
    conditions = _as_list("condition", condition)
    if len(styles) != len(conditions):
        raise ValueError(f"condition: {len(conditions)} maps for {len(styles)} style maps")
    for i, (s, c) in enumerate(zip(styles, conditions, strict=True)):
        if s.shape != c.shape:
            raise ValueError(f"condition[{i}]: shape {tuple(c.shape)} differs from "
                             f"style[{i}]'s {tuple(s.shape)}")
    match = patch_match(content, conditions, patch_size=patch_size, stride=1, padding=0,
                        backend=backend, precision=precision)
    h, w = content.shape[-2:]
    maps = [feature_swap(styles, match.index, patch_size=patch_size, out_size=(h, w), reduce="mean",
                         backend=backend)]
    other_styles = list(other_styles or ())
    if ratios is not None and len(ratios) != len(other_styles):
        raise ValueError(f"ratios: {len(ratios)} ratios for {len(other_styles)} other_styles levels")
    for layer, level in enumerate(other_styles):
        level = _as_list(f"other_styles[{layer}]", level)
        if len(level) != len(styles):
            raise ValueError(f"other_styles[{layer}]: {len(level)} maps for {len(styles)} references")
        ratio = _level_ratio(f"other_styles[{layer}]", level, styles,
                             None if ratios is None else ratios[layer])
        maps.append(feature_swap(level, match.index, patch_size=patch_size, scale=ratio,
                                 out_size=(h * ratio, w * ratio), reduce="mean", backend=backend))
    weights = None
    if is_weight:
        weights = match.score
        if norm_eps is not None:
            q_norm = patch_norms(content.to(weights.dtype), patch_size, 1)
            k_norm = chosen_key_norms([c.to(weights.dtype) for c in conditions], match.index, patch_size, 1)
            weights = renormalized(weights, q_norm, k_norm, norm_eps, norm_eps)
        weights = weights.to(result_dtype(content, *conditions))
    return SRNTTSwap(maps, weights, match.index)


def _level_ratio(name: str, level: Sequence[Tensor], styles: Sequence[Tensor], ratio: int | None) -> int:
    """The scale of ``level`` relative to ``styles``, checked against every reference's sizes."""
    h0 = styles[0].shape[-2]
    if ratio is None:
        ratio = level[0].shape[-2] // h0
        if ratio < 1 or level[0].shape[-2] != ratio * h0:
            raise ValueError(
                f"{name}: height {level[0].shape[-2]} is not an integer multiple of style's {h0} (SRNTT's "
                f"Swap asserts this too); srntt-pytorch's Swapper, whose ratios are fixed per layer, "
                f"accepts up to ratio - 1 extra rows and columns: pass ratios=(2, 4) for relu2_1, relu1_1")
    elif isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratios: expected positive ints, got {ratio!r}")
    for i, (v, s) in enumerate(zip(level, styles, strict=True)):
        # NB: the 3r x 3r windows at stride r of the level must form the same grid as the 3x3 patches
        # of the style: (H_l - 3r) // r + 1 == H - 2, i.e. H_l // r == H (and the same for widths).
        if v.shape[-2] // ratio != s.shape[-2] or v.shape[-1] // ratio != s.shape[-1]:
            raise ValueError(
                f"{name}[{i}]: a {tuple(v.shape[-2:])} map is not {ratio} times style[{i}]'s "
                f"{tuple(s.shape[-2:])} (up to {ratio - 1} extra rows and columns); its windows would not "
                f"line up with the matched patches")
    return ratio


# ---------------------------------------------------------------------------------------------
# weight maps

def _cubic(t: Tensor, a: float) -> list[Tensor]:
    """Keys cubic weights of the taps at offsets -1, 0, 1, 2 for fractional position ``t``."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _resize_axis_tf(x: Tensor, out: int, dim: int) -> Tensor:
    n = x.shape[dim]
    pos = torch.arange(out, dtype=torch.float64, device=x.device) * (n / out)
    base = pos.floor()
    t = (pos - base).to(x.dtype)
    base = base.long()
    shape = [1] * x.dim()
    shape[dim] = out
    result = 0
    for offset, weight in zip((-1, 0, 1, 2), _cubic(t, -0.75), strict=True):
        taps = (base + offset).clamp(0, n - 1)
        result = result + x.index_select(dim, taps) * weight.view(shape)
    return result


def tf_resize_bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow 1's ``tf.image.resize_bicubic`` (align_corners=False, half_pixel_centers=False).

    Source position ``dst * in / out``, Keys cubic with a = -0.75, out-of-range taps clamped to the
    edge; separable. ``x``: (..., H, W).

    NB: TensorFlow looks the weights up in a table with 1/1024 steps of the fractional position;
    for SRNTT's x2 and x4 the positions are multiples of 1/4, so the table is exact and so is this.
    """
    return _resize_axis_tf(_resize_axis_tf(x, size[0], x.dim() - 2), size[1], x.dim() - 1)


def srntt_weight_maps(weights: Tensor, scales: Sequence[int] = tuple(LEVELS.values()), *,
                      convention: str = "srntt") -> list[Tensor]:
    """SRNTT's weight maps from the valid-grid ``weights`` (B, Gh, Gw): (B, 1, H*s, W*s) per scale.

    ``convention="srntt"``: ``np.pad(weights, 1, 'edge')``, then ``tf.image.resize_bicubic`` to
    x2 / x4 (TensorFlow 1 sampling, :func:`tf_resize_bicubic`). ``"srntt-pytorch"``:
    ``F.pad(..., mode='replicate')`` then ``F.interpolate(..., mode='bicubic', align_corners=True)``.
    The model then applies ``sigmoid(a * w + b)`` with its own learned or fixed a, b.
    """
    if convention not in ("srntt", "srntt-pytorch"):
        raise ValueError(f"convention: expected 'srntt' or 'srntt-pytorch', got {convention!r}")
    if not isinstance(weights, Tensor) or weights.dim() != 3:
        raise ValueError("weights: expected a (B, Gh, Gw) tensor")
    base = F.pad(weights.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    h, w = base.shape[-2:]
    out = []
    for s in scales:
        if s == 1:
            out.append(base)
        elif convention == "srntt":
            out.append(tf_resize_bicubic(base, (h * s, w * s)))
        else:
            out.append(F.interpolate(base, scale_factor=s, mode="bicubic", align_corners=True))
    return out


# ---------------------------------------------------------------------------------------------
# drop-in classes

def _hwc_to_tensor(a, name: str) -> Tensor:
    a = np.squeeze(np.asarray(a))
    if a.ndim != 3:
        raise ValueError(f"{name}: expected an (H, W, C) array, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


class Swap:
    """SRNTT's ``Swap`` (``SRNTT/swap.py``) with the same method and numpy (H, W, C) interface.

    Switch: ``from SRNTT.swap import Swap`` becomes ``from srntt_core.compat.srntt import Swap``;
    ``sess`` is accepted and ignored. Returned maps are float32 (SRNTT's other layers are float64).
    """

    def __init__(self, patch_size: int = 3, stride: int = 1, sess=None, *, backend: str = "auto"):
        self.patch_size, self.stride, self.sess, self.backend = patch_size, stride, sess, backend

    def conditional_swap_multi_layer(self, content, style, condition, patch_size=3, stride=1,
                                     other_styles=None, is_weight=False):
        """Returns ``(maps, weights, max_idx)``: HWC float32 arrays, (Gh, Gw) or ``None``, (Gh, Gw) int64."""
        if not isinstance(style, list) or not isinstance(condition, list):
            raise TypeError("style, condition: expected lists of (H, W, C) arrays, one per reference")
        with torch.no_grad():
            result = srntt_swap(
                _hwc_to_tensor(content, "content"),
                [_hwc_to_tensor(s, f"style[{i}]") for i, s in enumerate(style)],
                [_hwc_to_tensor(c, f"condition[{i}]") for i, c in enumerate(condition)],
                [[_hwc_to_tensor(s, "other_styles") for s in level] for level in other_styles or ()],
                patch_size=patch_size, stride=stride, is_weight=is_weight, backend=self.backend,
            )
        maps = [m[0].permute(1, 2, 0).numpy() for m in result.maps]
        weights = None if result.weights is None else result.weights[0].numpy()
        return maps, weights, result.index[0].numpy()


class Swapper:
    """srntt-pytorch's ``Swapper``: ``__call__(map_in, map_ref, map_ref_blur, is_weight=True)``.

    The maps are dicts of (1, C, H, W) tensors with ``relu3_1``, ``relu2_1``, ``relu1_1``. Returns
    ``(maps, weights, max_idx)`` as numpy arrays like theirs: ``maps[layer]`` (C, H, W), ``weights``
    (Gh, Gw) with their +1e-5 patch norms, ``max_idx`` (Gh, Gw).
    """

    def __init__(self, patch_size: int = 3, stride: int = 1, *, backend: str = "auto"):
        self.patch_size, self.stride, self.backend = patch_size, stride, backend
        self.device = torch.device("cpu")

    def __call__(self, map_in: Mapping[str, Tensor], map_ref: Mapping[str, Tensor],
                 map_ref_blur: Mapping[str, Tensor], is_weight: bool = True):
        with torch.no_grad():
            result = srntt_swap(
                map_in["relu3_1"], map_ref["relu3_1"], map_ref_blur["relu3_1"],
                [map_ref[layer] for layer in LAYERS[1:]],
                patch_size=self.patch_size, stride=self.stride, is_weight=is_weight, norm_eps=1e-5,
                ratios=[LEVELS[layer] for layer in LAYERS[1:]], backend=self.backend,
            )
        maps = {layer: m[0].cpu().numpy() for layer, m in zip(LAYERS, result.maps, strict=True)}
        weights = None if result.weights is None else result.weights[0].cpu().numpy()
        return maps, weights, result.index[0].cpu().numpy()

    def to(self, device):
        self.device = torch.device(device)
        return self
