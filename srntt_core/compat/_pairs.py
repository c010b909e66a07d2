"""O(N) helpers shared by the compat modules: patch norms and re-normalized scores of chosen pairs.

Each codebase normalizes its best match's similarity a little differently (``F.normalize``, norm +
1e-5, none). The argmax only depends on the key-side normalization, so the compat modules match
with :func:`srntt_core.swap.patch_match` (plain cosine) and then recompute the codebase's own value
for the chosen pair from the cosine and the two patch norms, in O(N) memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.geometry import EPS


def result_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the originals return scores in: their inputs' (promoted) dtype. srntt-core scores
    half-precision inputs in float32 (exactly, then cast), where the originals compute in half."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def patch_norms(x: Tensor, patch_size: int, stride: int) -> Tensor:
    """L2 norm of every ``patch_size`` x ``patch_size`` x C patch on the valid grid: (B, Gh, Gw)."""
    sq = F.avg_pool2d(x.pow(2).sum(1, keepdim=True), patch_size, stride, divisor_override=1).squeeze(1)
    # NB: sqrt has an infinite derivative at 0; zero patches get norm 0 and a zero gradient.
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


def chosen_key_norms(keys: Sequence[Tensor], index: Tensor, patch_size: int, stride: int) -> Tensor:
    """Norms of the key patches selected by ``index`` (flat over the concatenated key grids)."""
    flat = torch.cat([patch_norms(k, patch_size, stride).flatten(1) for k in keys], dim=1)
    return flat.gather(1, index.flatten(1)).view_as(index).to(flat.dtype)


def renormalized(score: Tensor, q_norm: Tensor, k_norm: Tensor, q_add: float | None,
                 k_add: float | None) -> Tensor:
    """``<q, k> / (|q| + q_add) / (|k| + k_add)`` of the chosen pair from its cosine ``score``.

    ``score`` is ``<q, k> / (max(|q|, 1e-12) max(|k|, 1e-12))`` (patch_match's definition); a side
    whose ``*_add`` is ``None`` is left un-normalized (the raw inner product on that side).
    """
    dot = score * q_norm.clamp_min(EPS) * k_norm.clamp_min(EPS)
    if q_add is not None:
        dot = dot / (q_norm + q_add)
    if k_add is not None:
        dot = dot / (k_norm + k_add)
    return dot
