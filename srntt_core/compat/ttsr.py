"""TTSR-compatible search and transfer on srntt-core's O(N)-memory kernels.

Drop-in for ``SearchTransfer`` of TTSR (``model/SearchTransfer.py``) and ``SearchTransformer`` of
mmedit / mmagic (``models/editors/ttsr``). The published module does:

- search: unfold the LR↑ and Ref↓↑ level-3 features into 3x3 patches on the *same* grid
  (zero padding 1), ``F.normalize`` each patch vector, ``bmm`` (an ``N_lr x N_ref`` matrix), and take
  ``max`` over the reference axis: ``S`` (the best cosine) and its argmax;
- transfer: unfold the reference features at level 3 / 2 / 1 with kernel 3 / 6 / 12, padding
  1 / 2 / 4, stride 1 / 2 / 4, gather the argmax columns, ``fold`` them back and divide by 9
  everywhere (also on the border, where fewer than 9 windows overlap).

Here the search is :func:`srntt_core.swap.patch_match` with ``padding=1`` (cosine with
``max(|x|, 1e-12)`` in the denominators, which is exactly ``F.normalize``) and the transfer is
:func:`srntt_core.swap.feature_swap` with ``reduce="sum"`` divided by 9. Nothing of size
``N_lr x N_ref`` is allocated. Gradients flow where they flow in TTSR: ``S`` is differentiable with
respect to both level-3 inputs (through the selected pair) and the transferred maps with respect to
the reference features; the argmax is not differentiable in either.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..swap import feature_swap, patch_match
from ._pairs import result_dtype

__all__ = ["SearchTransfer", "SearchTransformer", "search_transfer"]

# TTSR's grid: 3x3 patches, stride 1, zero padding 1 (one cell per pixel of level 3).
_GRID = {"patch_size": 3, "stride": 1, "padding": 1}
_WINDOWS_PER_PIXEL = 9.0


def _check_level(name: str, value: Tensor, key: Tensor, scale: int) -> None:
    if not isinstance(value, Tensor) or value.dim() != 4:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a 4-d tensor (B, C, H, W), got {shape}")
    hk, wk = key.shape[-2:]
    hv, wv = value.shape[-2:]
    # NB: TTSR's unfold (kernel 3s, padding s, stride s) of a level-s map has (H // s) x (W // s)
    # windows; they line up with the level-3 argmax only when that equals the key grid.
    if (hv // scale, wv // scale) != (hk, wk) or value.shape[0] != key.shape[0]:
        raise ValueError(
            f"{name}: a level at scale {scale} of a {hk}x{wk} reference must be (B={key.shape[0]}, C, "
            f"H, W) with H // {scale} == {hk} and W // {scale} == {wk}, got shape {tuple(value.shape)}"
        )


def search_transfer(
    query: Tensor,
    key: Tensor,
    values: Sequence[Tensor],
    *,
    backend: str = "auto",
    precision: str = "highest",
) -> tuple[Tensor, list[Tensor], Tensor]:
    """TTSR's hard-attention search and transfer.

    Args:
        query: (B, C, H, W) LR↑ features at level 3 (TTSR ``lrsr_lv3``).
        key: (B, C, Hr, Wr) Ref↓↑ features at level 3 (``refsr_lv3``).
        values: reference features from coarse to fine, level i at ``2**i`` times ``key``'s size
            (``[ref_lv3, ref_lv2, ref_lv1]``; any number of levels, as in mmagic).

    Returns:
        ``(S, textures, index)``: ``S`` (B, 1, H, W) the best cosine similarity (computed in float32
        for half-precision inputs, returned in the inputs' dtype like TTSR's), ``textures[i]``
        (B, C_i, H * 2**i, W * 2**i) the transferred maps (window sum / 9), ``index`` (B, H, W) the
        flat position of the chosen reference patch (TTSR's ``R_lv3_star_arg``).
    """
    match = patch_match(query, key, backend=backend, precision=precision, **_GRID)
    h, w = query.shape[-2:]
    textures = []
    for level, value in enumerate(values):
        scale = 2**level
        _check_level(f"values[{level}]", value, key, scale)
        summed = feature_swap(value, match.index, scale=scale, out_size=(h * scale, w * scale),
                              reduce="sum", backend=backend, **_GRID)
        # In place where autograd allows it: the finest level is the largest tensor of the call.
        if summed.requires_grad:
            textures.append(summed / _WINDOWS_PER_PIXEL)
        else:
            textures.append(summed.div_(_WINDOWS_PER_PIXEL))
    return match.score.to(result_dtype(query, key)).unsqueeze(1), textures, match.index


class SearchTransfer(nn.Module):
    """TTSR's ``SearchTransfer``: same forward signature, same outputs, O(N) memory.

    ``forward(lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3) -> (S, T_lv3, T_lv2, T_lv1)`` with
    ``S`` (B, 1, H, W), ``T_lv3`` (B, C3, H, W), ``T_lv2`` (B, C2, 2H, 2W), ``T_lv1`` (B, C1, 4H, 4W).

    Switch: ``from model.SearchTransfer import SearchTransfer`` becomes
    ``from srntt_core.compat.ttsr import SearchTransfer``. The module has no parameters, so
    TTSR checkpoints load unchanged.
    """

    def __init__(self, backend: str = "auto", precision: str = "highest"):
        super().__init__()
        self.backend = backend
        self.precision = precision

    def forward(self, lrsr_lv3: Tensor, refsr_lv3: Tensor, ref_lv1: Tensor, ref_lv2: Tensor,
                ref_lv3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s, (t_lv3, t_lv2, t_lv1), _ = search_transfer(
            lrsr_lv3, refsr_lv3, [ref_lv3, ref_lv2, ref_lv1], backend=self.backend, precision=self.precision)
        return s, t_lv3, t_lv2, t_lv1


class SearchTransformer(nn.Module):
    """mmedit / mmagic's TTSR ``SearchTransformer``: ``forward(lq_up, ref_downup, refs)``.

    ``refs`` is the tuple of reference features from coarse to fine (``(N, C, H, W)``,
    ``(N, C/2, 2H, 2W)``, ...); returns ``(soft_attention (N, 1, H, W), textures)`` with textures
    in the same order.
    """

    def __init__(self, backend: str = "auto", precision: str = "highest"):
        super().__init__()
        self.backend = backend
        self.precision = precision

    def forward(self, lq_up: Tensor, ref_downup: Tensor,
                refs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if isinstance(refs, Tensor):
            raise TypeError("refs: expected a tuple of reference feature levels (coarse to fine), "
                            "got a tensor")
        soft_attention, textures, _ = search_transfer(
            lq_up, ref_downup, list(refs), backend=self.backend, precision=self.precision)
        return soft_attention, textures
