"""Public API: exact, O(N)-memory patch matching and texture swapping for Ref-SR.

>>> import torch, srntt_core.swap as sw
>>> q, k = torch.rand(1, 8, 20, 20), torch.rand(1, 8, 24, 18)
>>> m = sw.patch_match(q, k)                  # 3x3 patches, valid grid, cosine similarity
>>> m.index.shape, m.score.shape
(torch.Size([1, 18, 18]), torch.Size([1, 18, 18]))
>>> sw.feature_swap(k, m.index).shape         # k's textures in q's layout
torch.Size([1, 8, 20, 20])

Semantics are docs/CONTRACT.md §1-3, §7 (see docs/DESIGN.md); every op runs on the backend chosen by
``backend`` ("auto", "cpu", "cuda", "triton", "torch"; ``SRNTT_BACKEND`` overrides "auto").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import dispatch, geometry, library
from .ops.dispatch import BackendUnavailableError, available
from .ops.geometry import check_patch, check_scale, check_side
from .ops.library import PRECISIONS, REDUCTIONS, PatchMatch

__all__ = [
    "PatchMatch", "SwapResult", "patch_match", "feature_swap", "weight_maps", "texture_swap",
    "TextureSwapper", "BackendUnavailableError", "available", "LEVELS",
]

# SRNTT's swap levels: VGG layer -> scale relative to relu3_1.
LEVELS = {"relu3_1": 1, "relu2_1": 2, "relu1_1": 4}


class SwapResult(NamedTuple):
    """Result of :func:`texture_swap`.

    ``maps``: swapped reference features per layer (``relu3_1`` at LR size, ``relu2_1`` x2,
    ``relu1_1`` x4); ``weights``: similarity weight maps (B, 1, ., .) per layer; ``index`` and
    ``score``: the relu3_1 match on the valid grid.
    """

    maps: dict[str, Tensor]
    weights: dict[str, Tensor]
    index: Tensor
    score: Tensor


# ---------------------------------------------------------------------------------------------
# validation (docs/CONTRACT.md §6; bounds: docs/DESIGN.md, "Bounds and bad input")

_check_choice = library.check_choice


def _check_map(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor (B, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(t.shape)}")
    return t


def _as_list(name: str, x) -> tuple[list[Tensor], list[str]]:
    if isinstance(x, Tensor):
        return [x], [name]
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: empty list; give at least one tensor")
        return list(x), [f"{name}[{i}]" for i in range(len(x))]
    raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")


def _compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    # float16/bfloat16 inputs are matched in float32; float64 anywhere promotes everything.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _same_device(ref_name: str, ref: Tensor, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    for name, t in zip(names, tensors, strict=True):
        if t.device != ref.device:
            raise ValueError(f"{name}: on device {t.device}, but {ref_name} is on {ref.device}")


# ---------------------------------------------------------------------------------------------
# ops

def patch_match(
    query: Tensor,
    key: Tensor | Sequence[Tensor],
    *,
    patch_size: int = 3,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
    precision: str = "highest",
) -> PatchMatch:
    """For every query patch, the key patch with the highest cosine similarity.

    Args:
        query: (B, C, Hq, Wq) float features (e.g. relu3_1 of the bicubic-upsampled LR).
        key: (B, C, Hk, Wk) float features, or a list of them (several references, any sizes).
        patch_size, stride, padding: patches are every ``patch_size`` window at ``stride`` after
            zero padding by ``padding``. ``padding=0`` is SRNTT's valid grid, ``padding=1`` TTSR's same grid.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        precision: "highest" (fp32), "high" (TF32 allowed), "medium" (bf16 allowed); the chosen key's
            exact score is within 1e-5 / 1e-3 / 2e-3 of the exact maximum.

    Returns:
        ``PatchMatch(index, score)``, each (B, Gq_h, Gq_w). ``index`` (int64) is the flat row-major
        position of the best key patch over the concatenated key grids (list order); ties go to the
        smallest index. ``score`` is its cosine similarity (float32; float64 for float64 inputs),
        differentiable with respect to ``query`` and ``key``. Zero patches score 0.

    Memory: O(N_query + N_key) descriptors plus bounded tiles, never N_query x N_key.
    Raises ``ValueError``/``TypeError`` naming the argument on bad input, including NaN/Inf
    (checked inside the op, so the function compiles with ``fullgraph=True``) and integers out
    of their bounds (patch_size and stride in [1, 64], padding in [0, 64]).
    """
    _check_map("query", query)
    keys, names = _as_list("key", key)
    for name, k in zip(names, keys, strict=True):
        _check_map(name, k)
    patch_size, stride, padding = check_patch(patch_size, stride, padding)
    precision = _check_choice("precision", precision, PRECISIONS)
    _same_device("query", query, names, keys)
    for name, k in zip(names, keys, strict=True):
        if k.shape[0] != query.shape[0]:
            raise ValueError(f"{name}: batch size {k.shape[0]} differs from query's {query.shape[0]}")
        if k.shape[1] != query.shape[1]:
            raise ValueError(f"{name}: has {k.shape[1]} channels, but query has {query.shape[1]}")
        geometry.map_grid(name, k.shape[-2], k.shape[-1], patch_size, stride, padding)
    geometry.map_grid("query", query.shape[-2], query.shape[-1], patch_size, stride, padding)
    name = dispatch.resolve(backend, query.device)
    dtype = _compute_dtype([query, *keys])
    return library.patch_match(
        query.to(dtype).contiguous(), [k.to(dtype).contiguous() for k in keys],
        patch_size, stride, padding, name, precision,
    )


def feature_swap(
    values: Tensor | Sequence[Tensor],
    index: Tensor,
    *,
    patch_size: int = 3,
    stride: int = 1,
    padding: int = 0,
    scale: int = 1,
    out_size: tuple[int, int] | None = None,
    reduce: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Copy the matched reference windows of ``values`` into the query layout (texture swapping).

    Args:
        values: (B, Cv, Hk*scale, Wk*scale) reference features at a finer level (relu3_1: scale 1,
            relu2_1: 2, relu1_1: 4), or a list matching the key list given to :func:`patch_match`.
        index: (B, Gq_h, Gq_w) int64 output of :func:`patch_match` with the same patch parameters.
        scale: resolution of ``values`` relative to the matched maps; windows are
            ``patch_size*scale`` wide at stride ``stride*scale``.
        out_size: output (H, W); default ``((Gq - 1)*stride + patch_size - 2*padding) * scale``.
        reduce: "mean" divides each output pixel by the number of windows covering it (SRNTT,
            MASA-SR); "sum" does not (TTSR divides the sum by 9 itself).

    Returns:
        (B, Cv, H, W) in the dtype of ``values``, differentiable with respect to ``values``.
        Reads outside ``values`` are zeros; writes outside the output are dropped. NaN/Inf in
        ``values`` are not an error: they propagate to the output pixels whose windows read them.

    Raises ``ValueError``/``TypeError`` naming the argument on bad input: integers out of their
    bounds (patch_size and stride in [1, 64], padding in [0, 64], scale in [1, 16],
    out_size in [1, 65536] per side, at most 2**31 - 1 output elements, at most 2**25 index
    cells), and index values outside the key grids of ``values`` (checked inside the op: an index
    made on a larger grid, e.g. with padding=1 for a swap with padding=0, usually trips it). The
    index's shape is the query grid, which ``out_size`` may crop or extend freely, so it is not
    checked against anything.
    """
    value_list, names = _as_list("values", values)
    for name, v in zip(names, value_list, strict=True):
        _check_map(name, v)
    _same_device(names[0], value_list[0], names, value_list)
    # NB: no NaN/Inf check here (unlike patch_match): the swap is a linear copy, so a non-finite
    # value propagates exactly to the windows that read it, and checking would cost a full pass
    # over the values, more than the swap itself.
    if not isinstance(index, Tensor):
        raise TypeError(f"index: expected a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index: expected an integer (int64) tensor, got {index.dtype}")
    if index.dim() != 3 or index.numel() == 0:
        raise ValueError(
            f"index: expected a non-empty (B, Gq_h, Gq_w) tensor, got shape {tuple(index.shape)}")
    _same_device(names[0], value_list[0], ["index"], [index])
    b, cv = value_list[0].shape[:2]
    for name, v in zip(names, value_list, strict=True):
        if v.shape[0] != b or v.shape[1] != cv:
            raise ValueError(f"{name}: shape {tuple(v.shape)} differs in batch or channels from {names[0]}")
    if index.shape[0] != b:
        raise ValueError(f"index: batch size {index.shape[0]} differs from values' {b}")
    patch_size, stride, padding = check_patch(patch_size, stride, padding)
    scale = check_scale("scale", scale)
    reduce = _check_choice("reduce", reduce, REDUCTIONS)
    geometry.check_cells("index", index.numel())
    for name, v in zip(names, value_list, strict=True):
        geometry.value_grid(name, v.shape[-2], v.shape[-1], scale, patch_size, stride, padding)
    gqh, gqw = index.shape[-2:]
    if out_size is None:
        out_h = ((gqh - 1) * stride + patch_size - 2 * padding) * scale
        out_w = ((gqw - 1) * stride + patch_size - 2 * padding) * scale
        if not (1 <= out_h <= geometry.SIDE_MAX and 1 <= out_w <= geometry.SIDE_MAX):
            raise ValueError(
                f"out_size: the default output size ((Gq - 1)*stride + patch_size - 2*padding)*scale = "
                f"{out_h}x{out_w} (patch_size={patch_size}, stride={stride}, padding={padding}, "
                f"scale={scale}) is not in [1, {geometry.SIDE_MAX}] per side; pass out_size")
    else:
        if not (isinstance(out_size, (tuple, list)) and len(out_size) == 2):
            raise TypeError(f"out_size: expected (H, W), got {out_size!r}")
        out_h, out_w = (check_side("out_size", s) for s in out_size)
    geometry.check_elements("out_size", (b, cv, out_h, out_w), value_list[0].element_size())
    name = dispatch.resolve(backend, value_list[0].device)
    return library.feature_swap(
        [v.contiguous() for v in value_list], index.to(torch.int64).contiguous(),
        patch_size, stride, padding, scale, out_h, out_w, reduce, name,
    )


def weight_maps(
    score: Tensor,
    scales: Sequence[int] = tuple(LEVELS.values()),
    *,
    patch_size: int = 3,
    padding: int = 0,
    out_size: tuple[int, int] | None = None,
) -> list[Tensor]:
    """Similarity weight maps for each swap level, as SRNTT makes them.

    A valid-grid ``score`` (B, Gh, Gw) is padded by ``(patch_size - 1)//2 - padding`` cells with edge
    replication (SRNTT: 1 cell, giving the relu3_1 map size), optionally resized to ``out_size``, then
    bicubic-upsampled by each of ``scales``. Returns a list of (B, 1, H*s, W*s) tensors.
    Bounds: patch_size in [1, 64], padding in [0, 64], scales in [1, 16], out_size in
    [1, 65536] per side, at most 2**31 - 1 elements per map.
    """
    if not isinstance(score, Tensor) or not score.is_floating_point():
        raise TypeError("score: expected a floating-point tensor")
    if score.dim() != 3 or score.numel() == 0:
        raise ValueError(f"score: expected a non-empty (B, Gh, Gw) tensor, got shape {tuple(score.shape)}")
    patch_size, _, padding = check_patch(patch_size, 1, padding)
    if not isinstance(scales, (tuple, list)):
        raise TypeError(f"scales: expected a sequence of ints, got {type(scales).__name__}")
    scales = [check_scale("scales", s) for s in scales]
    base = score.unsqueeze(1)
    pad = (patch_size - 1) // 2 - padding
    if pad > 0:
        base = F.pad(base, (pad,) * 4, mode="replicate")
    if out_size is not None:
        if not (isinstance(out_size, (tuple, list)) and len(out_size) == 2):
            raise TypeError(f"out_size: expected (H, W), got {out_size!r}")
        out_size = tuple(check_side("out_size", s) for s in out_size)
    h, w = out_size or base.shape[-2:]
    for s in scales:
        geometry.check_elements("scales", (base.shape[0], 1, h * s, w * s), score.element_size())
    if out_size is not None and tuple(base.shape[-2:]) != out_size:
        base = F.interpolate(base, size=out_size, mode="bicubic", align_corners=False)
    return [base if s == 1 else F.interpolate(base, scale_factor=s, mode="bicubic", align_corners=False)
            for s in scales]


# ---------------------------------------------------------------------------------------------
# the SRNTT swap stage

def _bicubic(x: Tensor, factor: float) -> Tensor:
    # NB: antialias when shrinking, to behave like PIL's bicubic (docs/CONTRACT.md §10).
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False,
                         antialias=factor < 1).clamp(0, 1)


_DEFAULT_EXTRACTOR: nn.Module | None = None


def default_extractor() -> nn.Module:
    """The shared VGG19 (bundled weights) used when ``texture_swap`` is given no extractor."""
    global _DEFAULT_EXTRACTOR
    if _DEFAULT_EXTRACTOR is None:
        from .models.vgg import VGG19Features

        _DEFAULT_EXTRACTOR = VGG19Features(tuple(LEVELS)[::-1])
    return _DEFAULT_EXTRACTOR


def texture_swap(
    lr: Tensor,
    refs: Tensor | Sequence[Tensor],
    *,
    extractor: nn.Module | None = None,
    backend: str = "auto",
    precision: str = "highest",
    lr_up: Tensor | None = None,
) -> SwapResult:
    """The whole SRNTT swap stage, from images.

    Matching uses relu3_1 of the bicubic-upsampled LR against relu3_1 of the blurred reference
    (bicubic x1/4 then x4), 3x3 patches on the valid grid; the swapped maps come from the
    unblurred reference at relu3_1, relu2_1 and relu1_1.

    Args:
        lr: (B, 3, h, w) low-resolution RGB in [0, 1].
        refs: (B, 3, H, W) reference RGB in [0, 1] (H, W multiples of 4), or a list of them.
        extractor: a module mapping RGB [0, 1] to a dict with relu1_1, relu2_1, relu3_1
            (default: :class:`srntt_core.models.vgg.VGG19Features` with the bundled weights).
        lr_up: the upsampled LR to match with (default: bicubic x4 of ``lr``).
    """
    _check_map("lr", lr)
    ref_list, names = _as_list("refs", refs)
    for name, r in zip(names, ref_list, strict=True):
        _check_map(name, r)
        if r.shape[1] != 3 or r.shape[0] != lr.shape[0]:
            raise ValueError(f"{name}: expected (B={lr.shape[0]}, 3, H, W), got {tuple(r.shape)}")
        if r.shape[-2] % 4 or r.shape[-1] % 4:
            raise ValueError(f"{name}: height and width must be multiples of 4, got {tuple(r.shape[-2:])}")
    if lr.shape[1] != 3:
        raise ValueError(f"lr: expected 3 channels (RGB), got {lr.shape[1]}")
    _same_device("lr", lr, names, ref_list)
    library.check_finite(["lr", *names], [lr, *ref_list])
    if extractor is None:
        extractor = default_extractor().to(lr.device)
    if lr_up is None:
        lr_up = _bicubic(lr, 4)
    h, w = lr.shape[-2:]
    query = extractor(lr_up)["relu3_1"]
    keys, values = [], {layer: [] for layer in LEVELS}
    for r in ref_list:
        keys.append(extractor(_bicubic(_bicubic(r, 0.25), 4))["relu3_1"])
        feats = extractor(r)
        for layer in LEVELS:
            values[layer].append(feats[layer])
    match = patch_match(query, keys, backend=backend, precision=precision)
    maps = {
        layer: feature_swap(values[layer], match.index, scale=s, out_size=(h * s, w * s), backend=backend)
        for layer, s in LEVELS.items()
    }
    weights = dict(zip(LEVELS, weight_maps(match.score, scales=tuple(LEVELS.values())), strict=True))
    return SwapResult(maps, weights, match.index, match.score)


class TextureSwapper(nn.Module):
    """:func:`texture_swap` as a module; the VGG extractor is a (frozen) submodule."""

    def __init__(self, extractor: nn.Module | None = None, backend: str = "auto", precision: str = "highest"):
        super().__init__()
        if extractor is None:
            from .models.vgg import VGG19Features

            extractor = VGG19Features(tuple(LEVELS)[::-1])
        self.extractor = extractor
        self.backend = backend
        self.precision = precision

    def forward(self, lr: Tensor, refs: Tensor | Sequence[Tensor], lr_up: Tensor | None = None) -> SwapResult:
        return texture_swap(lr, refs, extractor=self.extractor, backend=self.backend,
                            precision=self.precision, lr_up=lr_up)


def similarity_flops(n_query: int, n_key: int, channels: int, patch_size: int = 3) -> float:
    """FLOPs of the direct method (2 * Nq * Nk * C * patch_size^2), for GFLOP/s figures."""
    return 2.0 * n_query * n_key * channels * patch_size * patch_size

