"""The competitors, written here from their published algorithms (no code copied).

Patch matching (all return ``(index, score)`` of shape (B, Gq_h, Gq_w), as ``srntt_core.swap.patch_match``):

- ``faiss_patch_match``: exhaustive inner-product search, faiss ``IndexFlatIP`` with k=1 over
  L2-normalized im2col patches (faiss runs it as blocked sgemm + a running top-1: the sgemm ceiling).
- ``ttsr_patch_match``: TTSR / mmagic ``SearchTransformer``: ``F.unfold`` both maps, ``F.normalize``
  the 2304-d columns, one ``bmm`` giving the full N_key x N_query relevance matrix, ``max`` over keys.
- ``srntt_conv_patch_match``: SRNTT (TensorFlow) / srntt-pytorch: the normalized reference patches
  are the filters of a ``conv2d`` over the query map, ``argmax`` over the filter axis. Chunked over
  the filters with a running maximum, so it fits in memory at every size.

Feature swapping (all return (B, Cv, out_h, out_w), ``reduce="mean"`` semantics of docs/CONTRACT.md §3):

- ``python_loop_swap``: SRNTT / srntt-pytorch: a Python loop over query patches that adds each
  matched reference window into the output and counts the overlaps.
- ``ttsr_fold_swap``: TTSR: ``F.unfold`` the values with kernel/stride/padding scaled by the level,
  ``gather`` the matched columns, ``F.fold`` them back, divide by the overlap count.

``*_bytes`` estimate each peer's working memory so that the benchmarks can skip the ones that
cannot fit, and say why. All peers take one key map (no reference lists).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srntt_core.cli.bench import faiss_patch_match, im2col, ttsr_patch_match  # noqa: F401  (re-exported)
from srntt_core.ops.geometry import EPS, grid_size
from srntt_core.swap import LEVELS

# Score tile of the chunked conv2d: filters per chunk x query cells x 4 bytes stays near this.
CONV_TILE_BYTES = 64 << 20


def _grids(query, key, patch_size, stride, padding):
    gq = [grid_size(s, patch_size, stride, padding) for s in query.shape[-2:]]
    gk = [grid_size(s, patch_size, stride, padding) for s in key.shape[-2:]]
    return gq, gk


def srntt_conv_patch_match(query, key, patch_size=3, stride=1, padding=0, tile_bytes=CONV_TILE_BYTES):
    b, c = query.shape[:2]
    (gqh, gqw), _ = _grids(query, key, patch_size, stride, padding)
    qp = F.pad(query, (padding,) * 4) if padding else query
    # NB: only the reference patches need normalizing for the argmax (SRNTT); the query norm is
    # applied once at the end to report the cosine score.
    q_norm = F.conv2d(qp.pow(2).sum(1, keepdim=True), qp.new_ones(1, 1, patch_size, patch_size),
                      stride=stride).sqrt().clamp_min(EPS).view(b, gqh, gqw)
    index = torch.empty(b, gqh, gqw, dtype=torch.long, device=query.device)
    score = torch.empty(b, gqh, gqw, dtype=query.dtype, device=query.device)
    for i in range(b):
        filters = F.normalize(im2col(key[i : i + 1], patch_size, stride, padding)[0], dim=1, eps=EPS)
        filters = filters.view(-1, c, patch_size, patch_size)
        chunk = max(1, tile_bytes // (gqh * gqw * query.element_size()))
        best = query.new_full((gqh, gqw), float("-inf"))
        arg = torch.zeros(gqh, gqw, dtype=torch.long, device=query.device)
        for k0 in range(0, filters.shape[0], chunk):
            out = F.conv2d(qp[i : i + 1], filters[k0 : k0 + chunk], stride=stride)[0]
            tile_best, tile_arg = out.max(dim=0)
            better = tile_best > best  # strict: earlier chunks win ties
            best = torch.where(better, tile_best, best)
            arg = torch.where(better, tile_arg + k0, arg)
        index[i], score[i] = arg, best / q_norm[i]
    return index, score


def _canvas(index, patch_size, stride, padding, scale, out_h, out_w):
    """Size of an output canvas that holds every (unclipped) window, and the crop offset."""
    gqh, gqw = index.shape[-2:]
    k, off = patch_size * scale, padding * scale
    h = max(out_h + off, (gqh - 1) * stride * scale + k)
    w = max(out_w + off, (gqw - 1) * stride * scale + k)
    return h, w, off


def _default_out(index, patch_size, stride, padding, scale):
    gqh, gqw = index.shape[-2:]
    return (((gqh - 1) * stride + patch_size - 2 * padding) * scale,
            ((gqw - 1) * stride + patch_size - 2 * padding) * scale)


def python_loop_swap(values, index, patch_size=3, stride=1, padding=0, scale=1, out_size=None):
    b, cv, _, wv = values.shape
    gkw = grid_size(wv // scale, patch_size, stride, padding)
    out_h, out_w = out_size or _default_out(index, patch_size, stride, padding, scale)
    ch, cw, off = _canvas(index, patch_size, stride, padding, scale, out_h, out_w)
    k, step = patch_size * scale, stride * scale
    # Zero-padded values make every read window in range, as the zero-read rule asks.
    vp = F.pad(values, (off, off + k, off, off + k))
    canvas = values.new_zeros(b, cv, ch, cw)
    count = values.new_zeros(ch, cw)
    gqh, gqw = index.shape[-2:]
    for n in range(b):
        rows = index[n].tolist()
        for i in range(gqh):
            for j in range(gqw):
                u, v = divmod(rows[i][j], gkw)
                canvas[n, :, i * step : i * step + k, j * step : j * step + k] += \
                    vp[n, :, u * step : u * step + k, v * step : v * step + k]
                if n == 0:  # the overlap count is the same for every batch element
                    count[i * step : i * step + k, j * step : j * step + k] += 1
    out = canvas / count.clamp_min(1)
    return out[:, :, off : off + out_h, off : off + out_w]


def ttsr_fold_swap(values, index, patch_size=3, stride=1, padding=0, scale=1, out_size=None):
    b = values.shape[0]
    k, step, off = patch_size * scale, stride * scale, padding * scale
    columns = F.unfold(values, k, padding=off, stride=step)  # (B, Cv*k*k, N_key)
    flat = index.reshape(b, 1, -1)
    picked = columns.gather(2, flat.expand(-1, columns.shape[1], -1))  # (B, Cv*k*k, N_query)
    # fold needs the size whose grid is exactly the query grid; other output sizes pad or crop it.
    size = _default_out(index, patch_size, stride, padding, scale)
    summed = F.fold(picked, size, k, padding=off, stride=step)
    count = F.fold(values.new_ones(1, k * k, flat.shape[-1]), size, k, padding=off, stride=step)
    out = summed / count.clamp_min(1)
    if out_size is not None and tuple(out_size) != size:
        out = F.pad(out, (0, out_size[1] - size[1], 0, out_size[0] - size[0]))
    return out


# ---------------------------------------------------------------------------------------------
# working-memory estimates (bytes), for skip decisions

def ttsr_patch_match_bytes(n_query, n_key, channels, patch_size=3, itemsize=4):
    descriptors = 2 * (n_query + n_key) * channels * patch_size**2 * itemsize  # unfold + normalize
    return descriptors + n_query * n_key * itemsize


def faiss_patch_match_bytes(n_query, n_key, channels, patch_size=3, itemsize=4):
    # both sides unfolded, normalized and made contiguous (two live copies at the peak), and faiss' own
    # copy of the keys
    d = channels * patch_size**2
    return 2 * (n_query + n_key) * d * itemsize + n_key * d * 4


def srntt_conv_patch_match_bytes(n_query, n_key, channels, patch_size=3, itemsize=4):
    return 2 * n_key * channels * patch_size**2 * itemsize + 2 * CONV_TILE_BYTES


def ttsr_fold_swap_bytes(n_query, n_key, value_channels, patch_size=3, scale=1, itemsize=4):
    column = value_channels * (patch_size * scale) ** 2 * itemsize
    return column * (n_key + n_query) + 8 * n_query  # unfolded values + gathered columns + index


# ---------------------------------------------------------------------------------------------
# the whole swap stage with a peer's match and swap

def peer_texture_swap(lr, ref, extractor, match, swap):
    """SRNTT's swap stage (as ``srntt_core.swap.texture_swap``) with ``match`` and ``swap`` from a peer:
    relu3_1 of the bicubic LR-up against relu3_1 of the blurred reference, then each level swapped
    from the unblurred reference. Returns ``({layer: map}, index, score)``."""

    def bicubic(x, factor):
        return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False,
                             antialias=factor < 1).clamp(0, 1)

    h, w = lr.shape[-2:]
    query = extractor(bicubic(lr, 4))["relu3_1"]
    key = extractor(bicubic(bicubic(ref, 0.25), 4))["relu3_1"]
    feats = extractor(ref)
    index, score = match(query, key)
    maps = {layer: swap(feats[layer], index, scale=s, out_size=(h * s, w * s)) for layer, s in LEVELS.items()}
    return maps, index, score
