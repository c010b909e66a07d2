"""The ``torch`` backend: plain-torch patch matching and feature swapping.

It is the test oracle (run it in float64) and the fallback where no kernel can run, so it is
kept short and obviously right rather than fast. It never holds N_query x N_key: query and key
patches are unfolded in bands of grid rows, and only a band-by-band score tile exists at a time.
Semantics: docs/DESIGN.md and docs/CONTRACT.md §1-3.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .geometry import EPS, grid_size

# Bytes allowed for one band of unfolded descriptors and for one score tile.
BAND_BYTES = 64 << 20
TILE_BYTES = 64 << 20
# NB: a GEMM may round the same dot product differently depending on the column's position in its
# register tile, so an exact duplicate of an earlier key patch can score an ulp higher. Scores
# within TIE_ULPS ulps of |q| (the largest possible unnormalized score) count as ties, which go to
# the smallest index. That is ~1e-6 relative in float32, far inside the 1e-5 "highest" contract.
TIE_ULPS = 16
# Below float64, a query whose runner-up scores within NEAR_ULPS rounding steps of |q| of its best
# is re-scored in float64. The float32 GEMM error of a 2304-long dot product is a few ulps of |q|
# in practice (its worst case grows with the length): 64 covers what real features show, and the
# re-scored candidates are then ordered exactly.
NEAR_ULPS = 64


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bands(x: torch.Tensor, patch_size: int, stride: int, padding: int, rows: int):
    """Yields ``(first_cell, descriptors (B, D, n_cells))`` for bands of ``rows`` grid rows."""
    gh = grid_size(x.shape[-2], patch_size, stride, padding)
    gw = grid_size(x.shape[-1], patch_size, stride, padding)
    xp = F.pad(x, (padding,) * 4) if padding else x
    for r0 in range(0, gh, rows):
        r1 = min(gh, r0 + rows)
        band = xp[:, :, r0 * stride : (r1 - 1) * stride + patch_size]
        yield r0 * gw, F.unfold(band, patch_size, stride=stride)


def _rows_per_band(x: torch.Tensor, patch_size: int, stride: int, padding: int, other_cells: int = 0) -> int:
    """Grid rows per band so that the band's descriptors, and its score tile against
    ``other_cells`` patches, stay within BAND_BYTES and TILE_BYTES."""
    b, c, _, w = x.shape
    gw = grid_size(w, patch_size, stride, padding)
    rows = BAND_BYTES // (b * c * patch_size * patch_size * gw * x.element_size())
    if other_cells:
        rows = min(rows, TILE_BYTES // (b * other_cells * gw * x.element_size()))
    return max(1, rows)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """fp32 matmuls without TF32/bf16 while inside, whatever the global setting.

    NB: torch.backends.cuda.matmul.allow_tf32 (or set_float32_matmul_precision("high")) would
    otherwise round the score GEMM's inputs to TF32: most scores more than 1e-5 off.
    """
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def patch_match(query, keys, patch_size, stride, padding, precision="highest"):
    """Exact patch matching (docs/CONTRACT.md §2): the key with the largest cosine, ties to the
    smallest index.

    Scores are computed in the inputs' dtype. Below float64, every query whose runner-up key comes
    within NEAR_ULPS rounding steps of its best is re-scored in float64 (:func:`_rescore_exact`), so
    near-ties go to the true maximum, as a float64 search would pick it, and only exact ties go to
    the smallest index.
    """
    del precision  # plain torch arithmetic in the input dtype is always "highest"
    b = query.shape[0]
    gqh = grid_size(query.shape[-2], patch_size, stride, padding)
    gqw = grid_size(query.shape[-1], patch_size, stride, padding)
    best = query.new_full((b, gqh * gqw), float("-inf"))
    best_index = torch.zeros((b, gqh * gqw), dtype=torch.long, device=query.device)
    q_norm = query.new_empty((b, gqh * gqw))
    tol = query.new_empty((b, gqh * gqw))
    exact = query.dtype == torch.float64
    # Keys within `near` of the best so far (counted conservatively: a re-score costs little).
    near_count = torch.zeros((b, gqh * gqw), dtype=torch.long, device=query.device)
    ulp = torch.finfo(query.dtype).eps
    q_rows = _rows_per_band(query, patch_size, stride, padding)
    for q0, q in _bands(query, patch_size, stride, padding, q_rows):
        nq = q.shape[-1]
        q_norm[:, q0 : q0 + nq] = q.norm(dim=1)
        tol[:, q0 : q0 + nq] = q_norm[:, q0 : q0 + nq] * TIE_ULPS * ulp
        near = q_norm[:, q0 : q0 + nq, None] * NEAR_ULPS * ulp
        qt = q.transpose(1, 2)
        offset = 0
        for key in keys:
            k_rows = _rows_per_band(key, patch_size, stride, padding, other_cells=nq)
            for k0, k in _bands(key, patch_size, stride, padding, k_rows):
                k = k / k.norm(dim=1, keepdim=True).clamp_min(EPS)
                with _ieee_fp32_matmul():
                    tile = torch.bmm(qt, k)
                tile_max = tile.amax(dim=2, keepdim=True)
                # First key within `tol` of the maximum: earlier keys keep ties.
                tile_arg = (tile >= tile_max - tol[:, q0 : q0 + nq, None]).to(torch.uint8).argmax(dim=2)
                tile_val = tile.gather(2, tile_arg.unsqueeze(2)).squeeze(2)
                cur = best[:, q0 : q0 + nq]
                if not exact:
                    in_tile = (tile >= tile_max - near).sum(dim=2)
                    count = near_count[:, q0 : q0 + nq]
                    gap = tile_max.squeeze(2) - cur
                    count.copy_(torch.where(gap > near.squeeze(2), in_tile,
                                            torch.where(gap >= -near.squeeze(2), count + in_tile, count)))
                better = tile_val > cur + tol[:, q0 : q0 + nq]  # strict: earlier keys keep ties
                cur.copy_(torch.where(better, tile_val, cur))
                idx = best_index[:, q0 : q0 + nq]
                idx.copy_(torch.where(better, tile_arg + offset + k0, idx))
            offset += grid_size(key.shape[-2], patch_size, stride, padding) * grid_size(
                key.shape[-1], patch_size, stride, padding)
    score = best / q_norm.clamp_min(EPS)
    if not exact:
        # A zero query patch scores 0 against every key: its tie (index 0) is exact already.
        ambiguous = (near_count > 1) & (q_norm > EPS)
        _rescore_exact(query, keys, patch_size, stride, padding, ambiguous, best_index, score)
    return best_index.view(b, gqh, gqw), score.view(b, gqh, gqw).to(score_dtype(query.dtype))


def _rescore_exact(query, keys, patch_size, stride, padding, ambiguous, best_index, score):
    """Re-scores the ``ambiguous`` (B, Nq) query cells against every key in float64, in place.

    The same banded search as :func:`patch_match`, on the gathered descriptors of those cells only.
    NB: a float64 GEMM still rounds by position (see TIE_ULPS), ~1e-16: scores within TIE_ULPS
    float64 rounding steps of |q| are exact ties and go to the smallest index.
    """
    ulp = torch.finfo(torch.float64).eps
    for bi in range(query.shape[0]):
        cells = ambiguous[bi].nonzero().squeeze(1)
        if cells.numel() == 0:
            continue
        q = _gather_cells(query[bi : bi + 1], cells, patch_size, stride, padding)  # (D, n) float64
        q_norm = q.norm(dim=0)
        tol = q_norm * TIE_ULPS * ulp
        best = q.new_full((cells.numel(),), float("-inf"))
        arg = torch.zeros(cells.numel(), dtype=torch.long, device=q.device)
        offset = 0
        for key in keys:
            k64 = key[bi : bi + 1].double()
            k_rows = _rows_per_band(k64, patch_size, stride, padding, other_cells=cells.numel())
            for k0, k in _bands(k64, patch_size, stride, padding, k_rows):
                k = k[0] / k[0].norm(dim=0, keepdim=True).clamp_min(EPS)
                tile = q.t() @ k
                tile_max = tile.amax(dim=1, keepdim=True)
                tile_arg = (tile >= tile_max - tol[:, None]).to(torch.uint8).argmax(dim=1)
                tile_val = tile.gather(1, tile_arg.unsqueeze(1)).squeeze(1)
                better = tile_val > best + tol
                best = torch.where(better, tile_val, best)
                arg = torch.where(better, tile_arg + offset + k0, arg)
            offset += grid_size(key.shape[-2], patch_size, stride, padding) * grid_size(
                key.shape[-1], patch_size, stride, padding)
        best_index[bi, cells] = arg
        score[bi, cells] = (best / q_norm.clamp_min(EPS)).to(score.dtype)


def _gather_cells(x, cells, patch_size, stride, padding):
    """Float64 descriptors (D, n) of the patch-grid ``cells`` (flat indices) of a (1, C, H, W) map,
    unfolded band by band so that no more than one band of descriptors exists at a time."""
    out = x.new_empty((x.shape[1] * patch_size * patch_size, cells.numel()), dtype=torch.float64)
    rows = _rows_per_band(x, patch_size, stride, padding)
    for c0, d in _bands(x, patch_size, stride, padding, rows):
        sel = ((cells >= c0) & (cells < c0 + d.shape[-1])).nonzero().squeeze(1)
        if sel.numel():
            out[:, sel] = d[0][:, cells[sel] - c0].double()
    return out


def _select(vals, idx, kk, tol):
    """The ``kk`` best of the candidates ``(vals, idx)`` (..., n), best first: repeatedly the
    remaining candidate with the smallest index among those within ``tol`` (..., 1) of the
    largest remaining value, as :func:`patch_match` picks one (its tie rule, K times).
    ``idx=None``: the candidates' indices are their positions (no index tensor is made).
    Missing candidates are (-inf, the largest int64)."""
    vals = vals.clone()
    none = torch.iinfo(torch.long).max
    if idx is not None:
        idx = idx.clone()
    out_v, out_i = [], []
    for _ in range(kk):
        near_top = vals >= vals.amax(dim=-1, keepdim=True) - tol
        if idx is None:
            pos = near_top.to(torch.uint8).argmax(dim=-1, keepdim=True)  # the first one
            out_i.append(pos)
        else:
            pos = torch.where(near_top, idx, none).argmin(dim=-1, keepdim=True)
            out_i.append(idx.gather(-1, pos))
            idx.scatter_(-1, pos, none)
        out_v.append(vals.gather(-1, pos))
        vals.scatter_(-1, pos, float("-inf"))
    return torch.cat(out_v, dim=-1), torch.cat(out_i, dim=-1)


def _topk_scan(q, keys, patch_size, stride, padding, kk, b_index=None):
    """The ``kk`` best (<q, k> / max(|k|, eps), index) pairs of the descriptors ``q`` (B, D, n)
    against every key patch, with :func:`_select`'s ties (TIE_ULPS rounding steps of |q|).
    ``b_index`` picks one batch element of the keys for a (1, D, n) ``q``."""
    n = q.shape[-1]
    tol = q.norm(dim=1)[..., None] * TIE_ULPS * torch.finfo(q.dtype).eps
    none = torch.iinfo(torch.long).max
    best = q.new_full((q.shape[0], n, kk), float("-inf"))
    best_index = torch.full((q.shape[0], n, kk), none, dtype=torch.long, device=q.device)
    qt = q.transpose(1, 2)
    offset = 0
    for key in keys:
        key = key if b_index is None else key[b_index : b_index + 1].to(q.dtype)
        k_rows = _rows_per_band(key, patch_size, stride, padding, other_cells=n)
        for k0, k in _bands(key, patch_size, stride, padding, k_rows):
            k = k / k.norm(dim=1, keepdim=True).clamp_min(EPS)
            with _ieee_fp32_matmul():
                tile = torch.bmm(qt, k)
            tile_v, tile_i = _select(tile, None, min(kk, tile.shape[-1]), tol)
            best, best_index = _select(torch.cat([best, tile_v], dim=-1),
                                       torch.cat([best_index, tile_i + offset + k0], dim=-1), kk, tol)
        offset += grid_size(key.shape[-2], patch_size, stride, padding) * grid_size(
            key.shape[-1], patch_size, stride, padding)
    return best, best_index


def patch_match_topk(query, keys, patch_size, stride, padding, precision="highest", k=1):
    """Exact top-k patch matching (docs/CONTRACT.md §2a): the ``k`` keys with the largest
    cosine per query patch, best first, ties to the smallest index; (B, Gq_h, Gq_w, k) each.

    Below float64 the scan keeps k + 1 candidates; a query whose k + 1 values come within
    NEAR_ULPS rounding steps of |q| of each other is scanned again in float64, so that the set and
    its order are those of a float64 search, as for k = 1 (:func:`patch_match`).
    """
    del precision  # plain torch arithmetic in the input dtype is always "highest"
    b = query.shape[0]
    gqh = grid_size(query.shape[-2], patch_size, stride, padding)
    gqw = grid_size(query.shape[-1], patch_size, stride, padding)
    exact = query.dtype == torch.float64
    kk = k if exact else k + 1
    vals = query.new_empty((b, gqh * gqw, kk))
    index = torch.empty((b, gqh * gqw, kk), dtype=torch.long, device=query.device)
    q_norm = query.new_empty((b, gqh * gqw))
    q_rows = _rows_per_band(query, patch_size, stride, padding)
    for q0, q in _bands(query, patch_size, stride, padding, q_rows):
        nq = q.shape[-1]
        q_norm[:, q0 : q0 + nq] = q.norm(dim=1)
        vals[:, q0 : q0 + nq], index[:, q0 : q0 + nq] = _topk_scan(q, keys, patch_size, stride, padding, kk)
    score = (vals[..., :k] / q_norm.clamp_min(EPS)[..., None]).to(score_dtype(query.dtype))
    index = index[..., :k].contiguous()
    if not exact:
        near = q_norm[..., None] * NEAR_ULPS * torch.finfo(query.dtype).eps
        ambiguous = ((vals[..., :-1] - vals[..., 1:]) <= near).any(dim=-1) & (q_norm > EPS)
        for bi in range(b):
            cells = ambiguous[bi].nonzero().squeeze(1)
            if cells.numel():
                q = _gather_cells(query[bi : bi + 1], cells, patch_size, stride, padding)[None]
                v64, i64 = _topk_scan(q, keys, patch_size, stride, padding, k, b_index=bi)
                index[bi, cells] = i64[0]
                score[bi, cells] = (v64[0] / q.norm(dim=1)[0, :, None].clamp_min(EPS)).to(score.dtype)
    return index.view(b, gqh, gqw, k), score.contiguous().view(b, gqh, gqw, k)


def unfold_all(x, patch_size, stride, padding):
    """All patch descriptors of ``x``: (B, C*patch_size^2, G_h*G_w)."""
    return F.unfold(x, patch_size, padding=padding, stride=stride)


def patch_match_score_backward(grad_score, query, keys, index, patch_size, stride, padding):
    """Gradient of the chosen pairs' cosine similarity w.r.t. query and keys (O(N) memory).

    With s = <q, k> / (max(|q|, eps) max(|k|, eps)):
      ds/dq = k / (|q| |k|') - s q / |q|^2   where |q| > eps, and 0 where |q| <= eps
    and symmetrically for k; patch gradients are folded back onto the feature maps.

    NB: a zero patch (|q| <= eps) scores 0 against every key, and its gradient is 0. The literal
    derivative of the clamped formula there is k / (eps |k|), ~1e12 per unit of grad_score: one
    flat (all-zero ReLU) region would swamp a training step, and overflow float16 to inf.
    """
    b, c, hq, wq = query.shape
    dtype = query.dtype
    q = unfold_all(query, patch_size, stride, padding)
    k_all = torch.cat([unfold_all(k, patch_size, stride, padding) for k in keys], dim=2)
    flat_index = index.reshape(b, 1, -1).expand(-1, q.shape[1], -1)
    k = k_all.gather(2, flat_index)
    g = grad_score.reshape(b, 1, -1).to(dtype)
    nq, nk = q.norm(dim=1, keepdim=True), k.norm(dim=1, keepdim=True)
    nq_c, nk_c = nq.clamp_min(EPS), nk.clamp_min(EPS)
    s = (q * k).sum(dim=1, keepdim=True) / (nq_c * nk_c)
    gq = torch.where(nq > EPS, g * (k / (nq_c * nk_c) - s / nq_c**2 * q), 0.0)
    gk = torch.where(nk > EPS, g * (q / (nq_c * nk_c) - s / nk_c**2 * k), 0.0)
    grad_query = F.fold(gq, (hq, wq), patch_size, padding=padding, stride=stride)
    gk_all = torch.zeros_like(k_all).scatter_add_(2, flat_index, gk)
    grad_keys, start = [], 0
    for key in keys:
        n = grid_size(key.shape[-2], patch_size, stride, padding) * grid_size(
            key.shape[-1], patch_size, stride, padding)
        grad_keys.append(F.fold(gk_all[:, :, start : start + n], key.shape[-2:], patch_size,
                                padding=padding, stride=stride))
        start += n
    return grad_query, grad_keys


def coverage_count(n_cells: int, window: int, step: int, pad: int, out: int, device, dtype):
    """How many of ``n_cells`` windows (top-left ``i*step - pad``, size ``window``) cover each
    of ``out`` pixels."""
    pos = torch.arange(out, device=device) + pad
    i_hi = torch.div(pos, step, rounding_mode="floor").clamp(max=n_cells - 1)
    i_lo = torch.div(pos - window, step, rounding_mode="floor") + 1
    return (i_hi - i_lo.clamp(min=0) + 1).clamp(min=0).to(dtype)


def _swap_layout(value_shapes, index, patch_size, stride, padding, scale, out_h, out_w):
    """Where each chosen window starts in the flattened, zero-padded, concatenated values, and
    the padded output size. Window offsets (dy, dx) are then plain additions."""
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    padded, base, row_len, offset = [], [], [], 0
    for hv, wv in value_shapes:
        gkh = grid_size(hv // scale, patch_size, stride, padding)
        gkw = grid_size(wv // scale, patch_size, stride, padding)
        hp, wp = max(hv + pad, (gkh - 1) * step + win), max(wv + pad, (gkw - 1) * step + win)
        padded.append((hp, wp))
        cells = torch.arange(gkh * gkw, device=index.device)
        base.append(offset + (cells // gkw) * step * wp + (cells % gkw) * step)
        row_len.append(torch.full((gkh * gkw,), wp, device=index.device))
        offset += hp * wp
    idx = index.reshape(index.shape[0], -1)
    gqh, gqw = index.shape[-2:]
    out_pad = (max(out_h + pad, (gqh - 1) * step + win), max(out_w + pad, (gqw - 1) * step + win))
    return padded, torch.cat(base)[idx], torch.cat(row_len)[idx], out_pad


def _out_window(out, dy, dx, gqh, gqw, step):
    """The output pixels that offset (dy, dx) of every query window lands on (a strided view)."""
    return out[:, :, dy : dy + (gqh - 1) * step + 1 : step, dx : dx + (gqw - 1) * step + 1 : step]


def _mean_count(gqh, gqw, win, step, pad, out_h, out_w, device, dtype):
    ch = coverage_count(gqh, win, step, pad, out_h, device, dtype)
    cw = coverage_count(gqw, win, step, pad, out_w, device, dtype)
    return ch[:, None] * cw[None, :]


def feature_swap(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce):
    """Feature swapping (docs/CONTRACT.md §3): the kernel-level op of this backend."""
    return feature_swap_blend(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce, None)


def feature_swap_blend(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce, weights):
    """Feature swapping by one gather and one strided add per window offset.

    With ``weights``, ``index`` and ``weights`` are (B, Gq_h, Gq_w, K): each query window is the
    weighted sum of its K matched windows (docs/CONTRACT.md §2a), in differentiable torch ops.
    NB: for a fixed offset (dy, dx) inside the window, distinct query cells write distinct output
    pixels, so the strided ``+=`` never collides and the result is deterministic.
    """
    b, cv = values[0].shape[:2]
    gqh, gqw = index.shape[1:3]
    if weights is None:
        index, weights = index.unsqueeze(-1), None
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    layouts = [_swap_layout([v.shape[-2:] for v in values], index[..., j], patch_size, stride, padding,
                            scale, out_h, out_w) for j in range(index.shape[-1])]
    padded, (oh, ow) = layouts[0][0], layouts[0][3]
    flat = torch.cat([
        F.pad(v, (pad, wp - pad - v.shape[-1], pad, hp - pad - v.shape[-2])).reshape(b, cv, hp * wp)
        for v, (hp, wp) in zip(values, padded, strict=True)], dim=2)
    w = None if weights is None else weights.to(flat.dtype).reshape(b, 1, gqh * gqw, -1)
    out = values[0].new_zeros((b, cv, oh, ow))
    for dy in range(win):
        for dx in range(win):
            windows = None
            for j, (_, src0, src_row, _) in enumerate(layouts):
                window = flat.gather(2, (src0 + dy * src_row + dx).unsqueeze(1).expand(-1, cv, -1))
                window = window if w is None else window * w[..., j]
                windows = window if windows is None else windows + window
            _out_window(out, dy, dx, gqh, gqw, step).add_(windows.view(b, cv, gqh, gqw))
    out = out[:, :, pad : pad + out_h, pad : pad + out_w]
    if reduce == "mean":
        count = _mean_count(gqh, gqw, win, step, pad, out_h, out_w, out.device, out.dtype)
        out = torch.where(count > 0, out / count.clamp(min=1), 0.0)
    return out.contiguous()


def feature_swap_backward(grad_out, index, value_sizes, patch_size, stride, padding, scale, reduce):
    """The adjoint of :func:`feature_swap` (which is linear in ``values``): the same windows, read
    from the output gradient and scatter-added into the values (deterministic on the CPU)."""
    b, cv, out_h, out_w = grad_out.shape
    gqh, gqw = index.shape[-2:]
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    shapes = [(value_sizes[2 * i], value_sizes[2 * i + 1]) for i in range(len(value_sizes) // 2)]
    padded, src0, src_row, (oh, ow) = _swap_layout(shapes, index, patch_size, stride, padding, scale,
                                                   out_h, out_w)
    if reduce == "mean":
        count = _mean_count(gqh, gqw, win, step, pad, out_h, out_w, grad_out.device, grad_out.dtype)
        grad_out = torch.where(count > 0, grad_out / count.clamp(min=1), 0.0)
    g = F.pad(grad_out, (pad, ow - pad - out_w, pad, oh - pad - out_h))
    flat = grad_out.new_zeros((b, cv, sum(hp * wp for hp, wp in padded)))
    for dy in range(win):
        for dx in range(win):
            src = (src0 + dy * src_row + dx).unsqueeze(1).expand(-1, cv, -1)
            flat.scatter_add_(2, src, _out_window(g, dy, dx, gqh, gqw, step).reshape(b, cv, -1))
    grads, start = [], 0
    for (hv, wv), (hp, wp) in zip(shapes, padded, strict=True):
        block = flat[:, :, start : start + hp * wp].view(b, cv, hp, wp)
        grads.append(block[:, :, pad : pad + hv, pad : pad + wv].contiguous())
        start += hp * wp
    return grads
