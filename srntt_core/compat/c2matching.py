"""C2-Matching / DATSR-compatible correspondence matching on srntt-core's O(N)-memory kernels.

Drop-in for ``feature_match_index`` (``mmsr/models/archs/ref_map_util.py`` in C2-Matching,
``datsr/models/archs/ref_map_util.py`` in DATSR) and for the matching step of their
``CorrespondenceGenerationArch`` / ``FlowSimCorrespondenceGenerationArch``:

1. each pixel's channel vector is L2-normalized (``F.normalize(feat.reshape(c, -1), dim=0)``);
2. 3x3 reference patches on the valid grid (no padding) are divided by their norm + 1e-5 and
   correlated with the input by ``conv2d`` (batches of reference patches, a running max);
3. with ``norm_input=True`` the best correlation is divided by the input patch's norm + 1e-5.

They return ``max_idx`` (flat row-major over the reference grid) and ``max_val``. Here the argmax is
:func:`srntt_core.swap.patch_match` (cosine) and ``max_val`` is recomputed for the chosen pair with
their +1e-5 norms, in O(N) memory.

NB: ranking by ``<q, k> / (|k| + 1e-5)`` and by the cosine ``<q, k> / |k|`` differs only by the
factor ``|k| / (|k| + 1e-5)``. After step 1 every pixel has norm 1 (or 0), so every patch without
all-zero pixels has the same norm (3 for 3x3) and the two rankings are identical; patches containing
all-zero pixels shift by at most 1e-5 relative, so the indices can differ only where the top two
candidates are within ~1e-5 of each other, and then both are maxima within that tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..swap import LEVELS, PatchMatch, patch_match
from ._pairs import chosen_key_norms, patch_norms, renormalized, result_dtype

__all__ = [
    "Correspondence", "CorrespondenceMatcher", "correspondence_match", "feature_match_index",
    "index_to_flow", "flow_maps", "offset_maps", "similarity_maps", "NORM_EPS",
]

NORM_EPS = 1e-5  # C2-Matching's addend on patch norms


class Correspondence(NamedTuple):
    """``index`` (B, Gh, Gw) int64 flat over the reference grid; ``value`` (B, Gh, Gw) their ``max_val``."""

    index: Tensor
    value: Tensor


def _strided_match(query: Tensor, key: Tensor, patch_size: int, input_stride: int, ref_stride: int,
                   backend: str, precision: str):
    """Cosine match of input patches at ``input_stride`` against reference patches at ``ref_stride``.

    patch_match takes one stride for both grids, so the input is cut into its ``ref_stride``
    phases: the input patches at rows a, a + s, a + 2s, ... (s = ref_stride) are the stride-s grid of
    the input cropped at row a. Each phase that holds input-grid patches is matched once and the
    needed cells are picked out; together the phases see each input patch once.
    """
    if input_stride == ref_stride:
        return patch_match(query, key, patch_size=patch_size, stride=ref_stride, padding=0,
                           backend=backend, precision=precision)
    b = query.shape[0]
    gh = (query.shape[-2] - patch_size) // input_stride + 1
    gw = (query.shape[-1] - patch_size) // input_stride + 1
    rows = torch.arange(gh, device=query.device) * input_stride
    cols = torch.arange(gw, device=query.device) * input_stride
    index = torch.empty((b, gh, gw), dtype=torch.long, device=query.device)
    score = None
    for a in range(ref_stride):
        r_sel = (rows % ref_stride == a).nonzero().flatten()
        for c in range(ref_stride):
            c_sel = (cols % ref_stride == c).nonzero().flatten()
            if len(r_sel) == 0 or len(c_sel) == 0:
                continue
            m = patch_match(query[..., a:, c:], key, patch_size=patch_size, stride=ref_stride, padding=0,
                            backend=backend, precision=precision)
            i = (rows[r_sel] // ref_stride)[:, None]
            j = (cols[c_sel] // ref_stride)[None, :]
            if score is None:
                score = m.score.new_empty((b, gh, gw))
            index[:, r_sel[:, None], c_sel[None, :]] = m.index[:, i, j]
            # NB: an index_put keeps autograd's path from score back to each phase's match.
            batch = torch.arange(b, device=query.device)[:, None, None]
            score = score.index_put((batch, r_sel[None, :, None], c_sel[None, None, :]), m.score[:, i, j])
    return PatchMatch(index, score)


def _match(query: Tensor, key: Tensor, patch_size: int, input_stride: int, ref_stride: int,
           norm_input: bool, backend: str, precision: str) -> Correspondence:
    match = _strided_match(query, key, patch_size, input_stride, ref_stride, backend, precision)
    dtype = match.score.dtype  # float32 for half-precision inputs: the norms are computed in it too
    q_norm = patch_norms(query.to(dtype), patch_size, input_stride)
    k_norm = chosen_key_norms([key.to(dtype)], match.index, patch_size, ref_stride)
    value = renormalized(match.score, q_norm, k_norm, NORM_EPS if norm_input else None, NORM_EPS)
    return Correspondence(match.index, value.to(result_dtype(query, key)))


def feature_match_index(
    feat_input: Tensor,
    feat_ref: Tensor,
    patch_size: int = 3,
    input_stride: int = 1,
    ref_stride: int = 1,
    is_norm: bool = True,
    norm_input: bool = False,
    *,
    backend: str = "auto",
    precision: str = "highest",
) -> tuple[Tensor, Tensor]:
    """C2-Matching's ``feature_match_index`` with the same arguments and results.

    Args:
        feat_input, feat_ref: (C, H, W) feature maps (the callers pass per-pixel normalized ones).
        patch_size: patch side. input_stride, ref_stride: strides of the input and reference grids.
        is_norm: must be True (reference patches divided by norm + 1e-5; the only mode the
            C2-Matching and DATSR models use).
        norm_input: also divide the best correlation by the input patch's norm + 1e-5.

    Returns:
        ``(max_idx, max_val)``, each (Gh, Gw): the flat index of the best reference patch and
        ``<q, k> / (|k| + 1e-5)`` (``/ (|q| + 1e-5)`` too with ``norm_input``) for it.
    """
    for name, t in (("feat_input", feat_input), ("feat_ref", feat_ref)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a (C, H, W) tensor, got {shape}")
    if not is_norm:
        raise ValueError("is_norm: only is_norm=True is supported (raw inner-product matching is not a "
                         "cosine search); C2-Matching and DATSR always pass True")
    for name, value in (("patch_size", patch_size), ("input_stride", input_stride),
                        ("ref_stride", ref_stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    index, value = _match(feat_input.unsqueeze(0), feat_ref.unsqueeze(0), patch_size, input_stride,
                          ref_stride, norm_input, backend, precision)
    return index[0], value[0]


def correspondence_match(
    feat_in: Tensor,
    feat_ref: Tensor,
    *,
    patch_size: int = 3,
    stride: int = 1,
    backend: str = "auto",
    precision: str = "highest",
) -> Correspondence:
    """The matching step of C2-Matching's / DATSR's correspondence generation, batched.

    Per-pixel channel L2 normalization of both (B, C, H, W) maps, then :func:`feature_match_index`
    with ``is_norm=True, norm_input=True`` for every batch element. Returns ``Correspondence(index,
    value)``, each (B, H - 2, W - 2) for 3x3 patches: their ``_max_idx`` and ``_max_val``.
    """
    dtype = result_dtype(feat_in, feat_ref)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    feat_in = F.normalize(feat_in.to(compute), dim=1)
    feat_ref = F.normalize(feat_ref.to(compute), dim=1)
    index, value = _match(feat_in, feat_ref, patch_size, stride, stride, True, backend, precision)
    return Correspondence(index, value.to(dtype))


class CorrespondenceMatcher(nn.Module):
    """:func:`correspondence_match` as a module: ``forward(feat_in, feat_ref) -> (index, value)``."""

    def __init__(self, patch_size: int = 3, stride: int = 1, backend: str = "auto",
                 precision: str = "highest"):
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.backend, self.precision = backend, precision

    def forward(self, feat_in: Tensor, feat_ref: Tensor) -> Correspondence:
        return correspondence_match(feat_in, feat_ref, patch_size=self.patch_size, stride=self.stride,
                                    backend=self.backend, precision=self.precision)


def index_to_flow(index: Tensor, ref_width: int | None = None) -> Tensor:
    """C2-Matching's ``index_to_flow``, batched: (B, Gh, Gw) index -> (B, Gh + 2, Gw + 2, 2) offsets.

    The last dimension is (x, y) = (matched column - column, matched row - row); the map is
    zero-padded by 2 at the bottom and right, as theirs. ``ref_width`` is the reference grid's width;
    C2-Matching uses the input grid's width (``None``, the default), which is right when input and
    reference have the same size, as in their models.
    """
    if index.dim() != 3:
        raise ValueError(f"index: expected (B, Gh, Gw), got shape {tuple(index.shape)}")
    b, h, w = index.shape
    width = w if ref_width is None else ref_width
    rows = torch.arange(h, device=index.device).view(1, h, 1)
    cols = torch.arange(w, device=index.device).view(1, 1, w)
    row_of = torch.div(index, width, rounding_mode="floor")
    flow = torch.stack(((index % width) - cols, row_of - rows), dim=-1)
    return F.pad(flow.float(), (0, 0, 0, 2, 0, 2))


def flow_maps(index: Tensor, ref_width: int | None = None) -> dict[str, Tensor]:
    """DATSR's ``pre_flow``: per layer, (B, H s, W s, 2) for s = 1, 2, 4 (relu3_1, relu2_1, relu1_1).

    :func:`index_to_flow` at relu3_1, each cell repeated s x s times and its (x, y) offset
    multiplied by s, as C2-Matching and DATSR build their relu2_1 / relu1_1 flows.
    """
    flow = index_to_flow(index, ref_width)
    return {layer: flow if s == 1 else
            flow.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2) * s for layer, s in LEVELS.items()}


def offset_maps(index: Tensor, ref_width: int | None = None) -> dict[str, Tensor]:
    """C2-Matching's / DATSR's ``pre_offset``: per layer, (B, 9, H s, W s, 2).

    Entry ``3 i + j`` is the layer's :func:`flow_maps` shifted down by ``i s`` and right by
    ``j s`` pixels, zero-filled (their ``tensor_shift``), for i, j in 0, 1, 2: the offsets of the
    nine taps of the deformable convolutions that consume them.
    """
    out = {}
    for layer, flow in flow_maps(index, ref_width).items():
        s = LEVELS[layer]
        b, h, w, _ = flow.shape
        shifted = flow.new_zeros((b, 9, h, w, 2))
        for i in range(3):
            for j in range(3):
                shifted[:, 3 * i + j, i * s:, j * s:] = flow[:, :max(h - i * s, 0), :max(w - j * s, 0)]
        out[layer] = shifted
    return out


def similarity_maps(value: Tensor) -> dict[str, Tensor]:
    """DATSR's ``pre_similarity``: the value map zero-padded by 1 (relu3_1), then repeated x2 and x4.

    ``value``: (B, Gh, Gw). Returns ``{"relu3_1": (B, 1, H, W), "relu2_1": (B, 1, 2H, 2W),
    "relu1_1": (B, 1, 4H, 4W)}`` with H = Gh + 2.
    """
    sim = F.pad(value, (1, 1, 1, 1)).unsqueeze(1)
    return {layer: sim.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3) for layer, s in LEVELS.items()}
