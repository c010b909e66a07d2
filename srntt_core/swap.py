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

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import dispatch, geometry, library, torch_backend
from .ops.dispatch import BackendUnavailableError, available
from .ops.geometry import check_patch, check_scale, check_side
from .ops.library import PRECISIONS, REDUCTIONS, PatchMatch

__all__ = [
    "PatchMatch", "SwapResult", "patch_match", "feature_swap", "weight_maps", "texture_swap",
    "TextureSwapper", "BackendUnavailableError", "available", "LEVELS", "UPSCALE", "bicubic",
    "ReferenceFeatures", "reference_features", "query_features", "swap_levels", "default_extractor",
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
    k: int | None = None,
) -> PatchMatch:
    """For every query patch, the key patch with the highest cosine similarity (the ``k`` best).

    Args:
        query: (B, C, Hq, Wq) float features (e.g. relu3_1 of the bicubic-upsampled LR).
        key: (B, C, Hk, Wk) float features, or a list of them (several references, any sizes).
        patch_size, stride, padding: patches are every ``patch_size`` window at ``stride`` after
            zero padding by ``padding``. ``padding=0`` is SRNTT's valid grid, ``padding=1`` TTSR's same grid.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        precision: "highest" (fp32), "high" (TF32 allowed), "medium" (bf16 allowed); the chosen key's
            exact score is within 1e-5 / 1e-3 / 2e-3 of the exact maximum.
        k: None for the best key; an int in [1, 64] (at most the number of key patches) for the
            ``k`` best, best first (docs/CONTRACT.md §2a).

    Returns:
        ``PatchMatch(index, score)``, each (B, Gq_h, Gq_w). ``index`` (int64) is the flat row-major
        position of the best key patch over the concatenated key grids (list order); ties go to the
        smallest index. ``score`` is its cosine similarity (float32; float64 for float64 inputs),
        differentiable with respect to ``query`` and ``key``. Zero patches score 0. With ``k``, each
        is (B, Gq_h, Gq_w, k), sorted by score descending, ties by smallest index; the j-th is the
        exact j-th best within the same tolerance.

    Memory: O(N_query + N_key) descriptors plus bounded tiles, never N_query x N_key.
    Raises ``ValueError``/``TypeError`` naming the argument on bad input, including NaN/Inf
    (checked inside the op, so the function compiles with ``fullgraph=True``) and integers out
    of their bounds (patch_size and stride in [1, 64], padding in [0, 64]).
    """
    _check_map("query", query)
    keys, names = _as_list("key", key)
    for name, t in zip(names, keys, strict=True):
        _check_map(name, t)
    patch_size, stride, padding = check_patch(patch_size, stride, padding)
    precision = _check_choice("precision", precision, PRECISIONS)
    if k is not None:
        k = geometry.check_int("k", k, 1, geometry.TOPK_MAX)
    _same_device("query", query, names, keys)
    for name, t in zip(names, keys, strict=True):
        if t.shape[0] != query.shape[0]:
            raise ValueError(f"{name}: batch size {t.shape[0]} differs from query's {query.shape[0]}")
        if t.shape[1] != query.shape[1]:
            raise ValueError(f"{name}: has {t.shape[1]} channels, but query has {query.shape[1]}")
    key_cells = sum(math.prod(geometry.map_grid(name, t.shape[-2], t.shape[-1], patch_size, stride, padding))
                    for name, t in zip(names, keys, strict=True))
    geometry.map_grid("query", query.shape[-2], query.shape[-1], patch_size, stride, padding)
    if k is not None:
        library.check_k(k, key_cells)
    dtype = _compute_dtype([query, *keys])
    inputs = dispatch.patch_match_inputs(query, keys, patch_size, stride, padding, dtype, k or 1)
    name = dispatch.resolve(backend, inputs)
    query, keys = query.to(dtype).contiguous(), [t.to(dtype).contiguous() for t in keys]
    if k is None:
        return library.patch_match(query, keys, patch_size, stride, padding, name, precision)
    return library.patch_match_topk(query, keys, patch_size, stride, padding, k, name, precision)


def _check_index(index, ref_name: str, ref: Tensor) -> Tensor:
    if not isinstance(index, Tensor):
        raise TypeError(f"index: expected a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index: expected an integer (int64) tensor, got {index.dtype}")
    if index.dim() not in (3, 4) or index.numel() == 0:
        raise ValueError("index: expected a non-empty (B, Gq_h, Gq_w) or (B, Gq_h, Gq_w, K) tensor, "
                         f"got shape {tuple(index.shape)}")
    _same_device(ref_name, ref, ["index"], [index])
    if index.shape[0] != ref.shape[0]:
        raise ValueError(f"index: batch size {index.shape[0]} differs from values' {ref.shape[0]}")
    return index


def _check_weights(name: str, w, index: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, Tensor) else type(w).__name__}")
    if w.shape != index.shape:
        raise ValueError(f"{name}: shape {tuple(w.shape)} differs from index's {tuple(index.shape)}")
    _same_device("index", index, [name], [w])
    library.check_finite([name], [w])
    return w


def _blend_weights(weights, score, temperature, index: Tensor) -> Tensor | None:
    """The (B, Gq_h, Gq_w, K) weights of a top-k index's K windows (None for a 3-d index)."""
    if index.dim() == 3:
        if weights is not None or score is not None:
            raise ValueError("weights: only for an index with a trailing K dimension (patch_match(..., k=K))")
        return None
    if weights is None:
        raise ValueError("weights: required for an index with a trailing K dimension: a tensor of "
                         "index's shape, or 'softmax' with score=")
    if isinstance(weights, str):
        _check_choice("weights", weights, ("softmax",))
        if score is None:
            raise ValueError("score: required with weights='softmax'")
        if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        return torch.softmax(_check_weights("score", score, index) / temperature, dim=-1)
    if score is not None:
        raise ValueError("score: only with weights='softmax'")
    return _check_weights("weights", weights, index)


def _out_size(out_size, grid, patch_size, stride, padding, scale) -> tuple[int, int]:
    if out_size is not None:
        if not (isinstance(out_size, (tuple, list)) and len(out_size) == 2):
            raise TypeError(f"out_size: expected (H, W), got {out_size!r}")
        return tuple(check_side("out_size", s) for s in out_size)
    out_h, out_w = (((g - 1) * stride + patch_size - 2 * padding) * scale for g in grid)
    if not (1 <= out_h <= geometry.SIDE_MAX and 1 <= out_w <= geometry.SIDE_MAX):
        raise ValueError(
            f"out_size: the default output size ((Gq - 1)*stride + patch_size - 2*padding)*scale = "
            f"{out_h}x{out_w} (patch_size={patch_size}, stride={stride}, padding={padding}, "
            f"scale={scale}) is not in [1, {geometry.SIDE_MAX}] per side; pass out_size")
    return out_h, out_w


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
    weights: Tensor | str | None = None,
    score: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Copy the matched reference windows of ``values`` into the query layout (texture swapping).

    Args:
        values: (B, Cv, Hk*scale, Wk*scale) reference features at a finer level (relu3_1: scale 1,
            relu2_1: 2, relu1_1: 4), or a list matching the key list given to :func:`patch_match`.
        index: (B, Gq_h, Gq_w) int64 output of :func:`patch_match` with the same patch parameters,
            or (B, Gq_h, Gq_w, K) of ``patch_match(..., k=K)``, blended by ``weights``.
        scale: resolution of ``values`` relative to the matched maps; windows are
            ``patch_size*scale`` wide at stride ``stride*scale``.
        out_size: output (H, W); default ``((Gq - 1)*stride + patch_size - 2*padding) * scale``.
        reduce: "mean" divides each output pixel by the number of windows covering it (SRNTT,
            MASA-SR); "sum" does not (TTSR divides the sum by 9 itself).
        weights: for a K-dimensional index only: a float tensor of the index's shape, or "softmax",
            ``softmax(score / temperature)`` over K of a ``score`` tensor of that shape (the scores
            of the top-k match). Each query window is then the weighted sum of its K matched windows:
            the result is exactly the sum over j of the swaps of ``index[..., j]`` whose windows are
            scaled by ``weights[..., j]`` (docs/CONTRACT.md §2a), computed with torch ops on
            any backend, differentiable with respect to ``values`` and the weights (or ``score``).

    Returns:
        (B, Cv, H, W) in the dtype of ``values``, differentiable with respect to ``values``.
        Reads outside ``values`` are zeros; writes outside the output are dropped. NaN/Inf in
        ``values`` are not an error: they propagate to the output pixels whose windows read them.

    Raises ``ValueError``/``TypeError`` naming the argument on bad input: integers out of their
    bounds (patch_size and stride in [1, 64], padding in [0, 64], scale in [1, 16],
    out_size in [1, 65536] per side, at most 2**31 - 1 output elements, at most 2**25 index
    cells), index values outside the key grids of ``values`` (checked inside the op: an index
    made on a larger grid, e.g. with padding=1 for a swap with padding=0, usually trips it), and
    weights or scores of another shape than the index, or with NaN/Inf. The index's shape is the
    query grid, which ``out_size`` may crop or extend freely, so it is not checked against anything.
    """
    value_list, names = _as_list("values", values)
    for name, v in zip(names, value_list, strict=True):
        _check_map(name, v)
    _same_device(names[0], value_list[0], names, value_list)
    # NB: no NaN/Inf check of the values (unlike patch_match): the swap is a linear copy, so a
    # non-finite value propagates exactly to the windows that read it, and checking would cost a
    # full pass over the values, more than the swap itself.
    index = _check_index(index, names[0], value_list[0])
    weights = _blend_weights(weights, score, temperature, index)
    b, cv = value_list[0].shape[:2]
    for name, v in zip(names, value_list, strict=True):
        if v.shape[0] != b or v.shape[1] != cv:
            raise ValueError(f"{name}: shape {tuple(v.shape)} differs in batch or channels from {names[0]}")
    patch_size, stride, padding = check_patch(patch_size, stride, padding)
    scale = check_scale("scale", scale)
    reduce = _check_choice("reduce", reduce, REDUCTIONS)
    geometry.check_cells("index", index.numel())
    n_cells = sum(math.prod(geometry.value_grid(name, v.shape[-2], v.shape[-1], scale, patch_size, stride,
                                                padding)) for name, v in zip(names, value_list, strict=True))
    out_h, out_w = _out_size(out_size, index.shape[1:3], patch_size, stride, padding, scale)
    geometry.check_elements("out_size", (b, cv, out_h, out_w), value_list[0].element_size())
    inputs = dispatch.feature_swap_inputs(value_list, index, patch_size, stride, padding, scale)
    name = dispatch.resolve(backend, inputs)
    value_list, index = [v.contiguous() for v in value_list], index.to(torch.int64).contiguous()
    if weights is not None:
        library.check_index_range(index, n_cells, patch_size, stride, padding, scale)
        return torch_backend.feature_swap_blend(value_list, index, patch_size, stride, padding, scale, out_h,
                                                out_w, reduce, weights)
    return library.feature_swap(value_list, index, patch_size, stride, padding, scale, out_h, out_w, reduce,
                                name)


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

# NB: the LR is matched upsampled by relu1_1's scale relative to relu3_1 (x4, SRNTT's SR factor), so
# relu3_1 of the upsampled LR has the LR's size and the swapped maps line up with the LR; a
# reference's sides are multiples of it, so that its relu1_1 values are exactly x4 its relu3_1 keys.
UPSCALE = LEVELS["relu1_1"]


def bicubic(x: Tensor, factor: float) -> Tensor:
    """Bicubic resampling of (B, 3, H, W) RGB in [0, 1] by ``factor``, clamped to [0, 1], as the swap
    stage resamples (NB: antialiased when shrinking, to behave like PIL's bicubic; docs/CONTRACT.md §10)."""
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


class ReferenceFeatures(NamedTuple):
    """VGG features of one reference: ``key``, relu3_1 of the blurred reference (bicubic x1/4 then
    x4), which the LR is matched against; ``values``, relu3_1/2_1/1_1 of the reference itself, which
    are swapped. Contiguous (the kernels read them so), so a kept copy is read as is by every match."""

    key: Tensor
    values: dict[str, Tensor]


def _extract(extractor: nn.Module, x: Tensor, channels_last: bool) -> dict[str, Tensor]:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return extractor(x)


def reference_features(ref: Tensor, extractor: nn.Module | None = None, *,
                       channels_last: bool = False) -> ReferenceFeatures:
    """The :class:`ReferenceFeatures` of ``ref`` (B, 3, H, W) in [0, 1], H and W multiples of 4: two
    VGG passes, computed once per reference however many inputs or tiles are matched against it.

    ``extractor``: as for :func:`texture_swap`. ``channels_last``: run the VGG passes in channels-last
    layout (the layout of the fast path's Winograd and oneDNN convolutions on CPU); the features are
    stored contiguous either way.
    """
    extractor = extractor if extractor is not None else default_extractor().to(ref.device)
    blurred = bicubic(bicubic(ref, 1 / UPSCALE), UPSCALE)
    key = _extract(extractor, blurred, channels_last)["relu3_1"].contiguous()
    feats = dict(_extract(extractor, ref, channels_last))
    # NB: each level's channels-last map is dropped as soon as its contiguous copy exists, so that
    # both layouts of all three levels are never held at once (~0.4 GB less peak at 1080p).
    return ReferenceFeatures(key, {layer: feats.pop(layer).contiguous() for layer in LEVELS})


def query_features(lr: Tensor, extractor: nn.Module | None = None, *, lr_up: Tensor | None = None,
                   channels_last: bool = False) -> Tensor:
    """relu3_1 of the upsampled LR (``lr_up``, default bicubic x4 of ``lr``): the LR's side of the match."""
    extractor = extractor if extractor is not None else default_extractor().to(lr.device)
    return _extract(extractor, bicubic(lr, UPSCALE) if lr_up is None else lr_up, channels_last)["relu3_1"]


def swap_levels(values: Sequence[dict[str, Tensor]], index: Tensor, size: tuple[int, int], *,
                backend: str = "auto") -> dict[str, Tensor]:
    """The matched windows of every reference's ``values`` at each level of :data:`LEVELS`, in the
    layout of an LR of ``size`` (h, w): relu3_1 at (h, w), relu2_1 at x2, relu1_1 at x4."""
    h, w = size
    return {layer: feature_swap([v[layer] for v in values], index, scale=s, out_size=(h * s, w * s),
                                backend=backend)
            for layer, s in LEVELS.items()}


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
    unblurred reference at relu3_1, relu2_1 and relu1_1 (:func:`query_features`,
    :func:`reference_features`, :func:`swap_levels`).

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
        if r.shape[-2] % UPSCALE or r.shape[-1] % UPSCALE:
            raise ValueError(f"{name}: height and width must be multiples of {UPSCALE}, "
                             f"got {tuple(r.shape[-2:])}")
    if lr.shape[1] != 3:
        raise ValueError(f"lr: expected 3 channels (RGB), got {lr.shape[1]}")
    _same_device("lr", lr, names, ref_list)
    library.check_finite(["lr", *names], [lr, *ref_list])
    if extractor is None:
        extractor = default_extractor().to(lr.device)
    query = query_features(lr, extractor, lr_up=lr_up)
    feats = [reference_features(r, extractor) for r in ref_list]
    match = patch_match(query, [f.key for f in feats], backend=backend, precision=precision)
    maps = swap_levels([f.values for f in feats], match.index, tuple(lr.shape[-2:]), backend=backend)
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

