"""Feature swapping in Triton: forward and its deterministic adjoint (docs/DESIGN.md, docs/CONTRACT.md §3).

Forward. Query cell (i, j), matched to key cell (u, v), copies the (P*scale)^2 window of values
with top-left ((u*s - p)*scale, (v*s - p)*scale) into the output window with top-left
((i*s - p)*scale, (j*s - p)*scale). Computed as a gather per output pixel: along each axis a pixel
lies in at most T = ceil(P / s) output windows, the cells i = i_hi - t, t < T, with
i_hi = (y + p*scale) // (s*scale); each program sums those T^2 contributions for a tile of
pixels x channels. No atomics; reads outside values are zero, pixels of the output beyond the
windows get no contribution. ``reduce="mean"`` divides by count_h(y) * count_w(x), the number of
windows covering the pixel (whether or not their reads were in range).

Backward. grad_values[r] at pixel (y', x') gathers grad_out from every query cell whose matched key
cell's window covers (y', x'): the at most T^2 key cells covering the pixel, each with the list of
query cells matched to it. The lists come from an inverse map built with a stable sort of the
index plus CSR offsets (searchsorted), O(N) memory and work. A list longer than _CHUNK (ties, or
zero query patches all matched to key 0: ~1e5 cells at 4K) would serialize one program: it is cut
into chunks of _CHUNK cells whose window sums a first kernel computes in parallel, and the gather
adds that key's chunk sums instead. The summation order is fixed either way, so the result is
bitwise deterministic.

Several value maps: a host loop over them; the forward accumulates into the output in list order.
"""

import torch
import triton
import triton.language as tl

from .patch_match import INTERPRET, grid_size, launch, register_op

_BLOCK_PIX = 64 if INTERPRET else 128
_BLOCK_C = 16 if INTERPRET else 32
# The backward keeps, per channel of its tile, 64-bit addresses of two gathers over T^2 unrolled
# windows: 8 channels per program fit its registers (32 spilled 0.9-1.3 KB on sm_80/sm_90, ptxas).
_BWD_BLOCK_C = 16 if INTERPRET else 8
_NUM_WARPS = 4
# Query cells per chunk of a heavy inverse list (a key cell matched by more cells than this).
_CHUNK = 8 if INTERPRET else 256


@triton.jit
def _div_rn(a, b, ACC_DTYPE: tl.constexpr):
    """a / b rounded to nearest, as on the CPU. NB: a float32 '/' compiles to div.full.f32 (up to
    2 ulp off); float64 division is always IEEE."""
    if ACC_DTYPE == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _cover_count(coord, n_cells, padding, stride, scale, P: tl.constexpr, T: tl.constexpr):
    """Number of windows (cells 0 <= i < n_cells) covering pixel coordinate ``coord`` along one axis."""
    shifted = coord + padding * scale
    hi = shifted // (stride * scale)
    count = tl.zeros(coord.shape, dtype=tl.int32)
    for t in tl.static_range(T):
        i = hi - t
        count += ((i >= 0) & (i < n_cells) & (shifted - i * stride * scale < P * scale)).to(tl.int32)
    return count


@triton.jit
def _feature_swap_fwd_kernel(
    v_ptr,
    idx_ptr,
    out_ptr,
    Cv,
    Hv,
    Wv,
    out_h,
    out_w,
    Gqh,
    Gqw,
    Gk,
    Gkw,
    key_offset,
    stride,
    padding,
    scale,
    P: tl.constexpr,
    T: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    MEAN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pix = pid_p * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    p_mask = pix < out_h * out_w
    y = pix // out_w
    x = pix % out_w
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < Cv
    step = stride * scale
    yy = y + padding * scale
    xx = x + padding * scale
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=ACC_DTYPE)
    v_base = v_ptr + (b * Cv + ch[None, :]) * Hv * Wv
    for ti in tl.static_range(T):
        i = yy // step - ti
        dy = yy - i * step
        ok_i = (i >= 0) & (i < Gqh) & (dy < P * scale)
        for tj in tl.static_range(T):
            j = xx // step - tj
            dx = xx - j * step
            ok = p_mask & ok_i & (j >= 0) & (j < Gqw) & (dx < P * scale)
            loc = tl.load(idx_ptr + b * Gqh * Gqw + i * Gqw + j, mask=ok, other=0) - key_offset
            ok = ok & (loc >= 0) & (loc < Gk)
            sy = ((loc // Gkw) * stride - padding) * scale + dy
            sx = ((loc % Gkw) * stride - padding) * scale + dx
            ok = ok & (sy >= 0) & (sy < Hv) & (sx >= 0) & (sx < Wv)
            acc += tl.load(
                v_base + (sy * Wv + sx)[:, None], mask=ok[:, None] & c_mask[None, :], other=0.0
            ).to(ACC_DTYPE)
    out_ptrs = out_ptr + (b * Cv + ch[None, :]) * out_h * out_w + pix[:, None]
    o_mask = p_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=o_mask, other=0.0).to(ACC_DTYPE)
    if MEAN:
        count = _cover_count(y, Gqh, padding, stride, scale, P, T) * _cover_count(
            x, Gqw, padding, stride, scale, P, T
        )
        acc = tl.where(
            count[:, None] > 0, _div_rn(acc, tl.maximum(count, 1).to(ACC_DTYPE)[:, None], ACC_DTYPE), 0.0
        )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _cover_counts(n_out, n_cells, patch_size, stride, padding, scale, device):
    """count[y]: windows (cells 0 <= i < n_cells) covering output coordinate y along one axis (int32)."""
    step = stride * scale
    y = torch.arange(n_out, device=device) + padding * scale
    first = (-torch.div(-(y - patch_size * scale + 1), step, rounding_mode="floor")).clamp_min(0)
    last = torch.div(y, step, rounding_mode="floor").clamp_max(n_cells - 1)
    return (last - first + 1).clamp_min(0).to(torch.int32)


@triton.jit
def _swap_grad_window(grad_ptr, count_h_ptr, count_w_ptr, cell, live, dy, dx, ch, c_mask, b, Cv, out_h, out_w,
                      Gqw, stride, padding, scale, MEAN: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """grad_out at offset (dy, dx) of query ``cell``'s output window (0 outside it), divided by the
    pixel's window count for reduce="mean"; shape (len(cell), BLOCK_C)."""
    oy = ((cell // Gqw) * stride - padding) * scale + dy
    ox = ((cell % Gqw) * stride - padding) * scale + dx
    live = live & (oy >= 0) & (oy < out_h) & (ox >= 0) & (ox < out_w)
    g = tl.load(
        grad_ptr + (b * Cv + ch[None, :]) * out_h * out_w + (oy * out_w + ox)[:, None],
        mask=live[:, None] & c_mask[None, :],
        other=0.0,
    ).to(ACC_DTYPE)
    if MEAN:
        count = tl.load(count_h_ptr + oy, mask=live, other=1) * tl.load(count_w_ptr + ox, mask=live, other=1)
        g = _div_rn(g, tl.maximum(count, 1).to(ACC_DTYPE)[:, None], ACC_DTYPE)
    return g


@triton.jit
def _feature_swap_bwd_chunk_kernel(
    grad_ptr,
    csr_ptr,
    cells_ptr,
    chunk_off_ptr,
    chunk_key_ptr,
    count_h_ptr,
    count_w_ptr,
    part_ptr,
    Cv,
    out_h,
    out_w,
    Gq,
    Gqw,
    Nk_total,
    NC,
    stride,
    padding,
    scale,
    WIN: tl.constexpr,
    CHUNK: tl.constexpr,
    MEAN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """part[b, c, ch, w]: sum over the cells of chunk c (of a heavy list) of their grad_out window at
    window pixel w = dy * WIN + dx, in list order. Chunks past the last one (static grid) do nothing."""
    n_wblocks = tl.cdiv(WIN * WIN, BLOCK_PIX)
    c = tl.program_id(0) // n_wblocks
    wb = tl.program_id(0) % n_wblocks
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    key = tl.load(chunk_key_ptr + b * NC + c)
    if key < Nk_total:
        j = c - tl.load(chunk_off_ptr + b * (Nk_total + 1) + key)
        start = tl.load(csr_ptr + b * (Nk_total + 1) + key) + j * CHUNK
        end = tl.minimum(tl.load(csr_ptr + b * (Nk_total + 1) + key + 1), start + CHUNK)
        w = wb * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
        w_mask = w < WIN * WIN
        dy = w // WIN
        dx = w % WIN
        ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = ch < Cv
        acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=ACC_DTYPE)
        for t in range(start, end):
            cell = tl.load(cells_ptr + b * Gq + t) + tl.zeros((BLOCK_PIX,), dtype=tl.int64)
            acc += _swap_grad_window(grad_ptr, count_h_ptr, count_w_ptr, cell, w_mask, dy, dx, ch, c_mask, b,
                                     Cv, out_h, out_w, Gqw, stride, padding, scale, MEAN, ACC_DTYPE)
        tl.store(
            part_ptr + ((b * NC + c) * Cv + ch[None, :]) * WIN * WIN + w[:, None],
            acc,
            mask=w_mask[:, None] & c_mask[None, :],
        )


@triton.jit
def _feature_swap_bwd_kernel(
    grad_ptr,
    csr_ptr,
    cells_ptr,
    chunk_off_ptr,
    part_ptr,
    count_h_ptr,
    count_w_ptr,
    gv_ptr,
    Cv,
    Hv,
    Wv,
    out_h,
    out_w,
    Gq,
    Gqh,
    Gqw,
    Gkh,
    Gkw,
    Nk_total,
    NC,
    key_offset,
    stride,
    padding,
    scale,
    P: tl.constexpr,
    T: tl.constexpr,
    CHUNK: tl.constexpr,
    MEAN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pix = pid_p * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    p_mask = pix < Hv * Wv
    y = pix // Wv
    x = pix % Wv
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < Cv
    step = stride * scale
    yy = y + padding * scale
    xx = x + padding * scale
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=ACC_DTYPE)
    WIN = P * scale
    for tu in tl.static_range(T):
        u = yy // step - tu
        dy = yy - u * step
        ok_u = (u >= 0) & (u < Gkh) & (dy < P * scale)
        for tv in tl.static_range(T):
            v = xx // step - tv
            dx = xx - v * step
            ok = p_mask & ok_u & (v >= 0) & (v < Gkw) & (dx < P * scale)
            key = key_offset + u * Gkw + v
            start = tl.load(csr_ptr + b * (Nk_total + 1) + key, mask=ok, other=0)
            n = tl.load(csr_ptr + b * (Nk_total + 1) + key + 1, mask=ok, other=0) - start
            # Query cells matched to this key cell, in increasing cell order (stable sort); a heavy
            # list contributes its chunk sums, in chunk order.
            heavy = n > CHUNK
            steps = tl.where(heavy, tl.cdiv(n, CHUNK), n)
            first = tl.load(chunk_off_ptr + b * (Nk_total + 1) + key, mask=ok & heavy, other=0)
            for t in range(0, tl.max(steps, axis=0)):
                live = t < steps
                cell = tl.load(cells_ptr + b * Gq + start + t, mask=live & ~heavy, other=0)
                acc += _swap_grad_window(grad_ptr, count_h_ptr, count_w_ptr, cell, live & ~heavy, dy, dx, ch,
                                         c_mask, b, Cv, out_h, out_w, Gqw, stride, padding, scale, MEAN,
                                         ACC_DTYPE)
                chunk = (b * NC + first + t)[:, None]
                part = part_ptr + (chunk * Cv + ch[None, :]) * WIN * WIN + (dy * WIN + dx)[:, None]
                acc += tl.load(part, mask=(live & heavy)[:, None] & c_mask[None, :], other=0.0)
    tl.store(
        gv_ptr + (b * Cv + ch[None, :]) * Hv * Wv + pix[:, None],
        acc.to(gv_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


def _torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator of a swap in ``dtype``: float64 stays, everything else sums in float32 and rounds once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if _torch_acc_dtype(dtype) == torch.float64 else tl.float32


def _key_grids(value_hw, patch_size, stride, padding, scale):
    """(Gk_h, Gk_w, offset) per value map, offsets over the concatenated key grids."""
    grids, offset = [], 0
    for h, w in value_hw:
        gh = grid_size(h // scale, patch_size, stride, padding)
        gw = grid_size(w // scale, patch_size, stride, padding)
        grids.append((gh, gw, offset))
        offset += gh * gw
    return grids, offset


@register_op("srntt::_feature_swap_triton")
def feature_swap(
    values: list[torch.Tensor],
    index: torch.Tensor,
    patch_size: int,
    stride: int,
    padding: int,
    scale: int,
    out_h: int,
    out_w: int,
    reduce: str,
) -> torch.Tensor:
    """Swapped map (B, Cv, out_h, out_w): the values windows of the matched key cells, summed or averaged."""
    b, cv = values[0].shape[:2]
    gqh, gqw = index.shape[1:]
    grids, _ = _key_grids([v.shape[2:] for v in values], patch_size, stride, padding, scale)
    # NB: several value maps accumulate into out between launches: float16/bfloat16 sum in a float32
    # buffer and round once at the end.
    out = values[0].new_empty(
        (b, cv, out_h, out_w), dtype=torch.float64 if values[0].dtype == torch.float64 else torch.float32
    )
    grid = (triton.cdiv(out_h * out_w, _BLOCK_PIX), triton.cdiv(cv, _BLOCK_C), b)
    for r, (v, (gkh, gkw, offset)) in enumerate(zip(values, grids, strict=True)):
        launch(
            _feature_swap_fwd_kernel,
            grid,
            v,
            index,
            out,
            cv,
            v.shape[2],
            v.shape[3],
            out_h,
            out_w,
            gqh,
            gqw,
            gkh * gkw,
            gkw,
            offset,
            stride,
            padding,
            scale,
            P=patch_size,
            T=-(-patch_size // stride),
            ACCUMULATE=r > 0,
            MEAN=reduce == "mean" and r == len(values) - 1,
            ACC_DTYPE=_acc_dtype(out.dtype),
            BLOCK_PIX=_BLOCK_PIX,
            BLOCK_C=_BLOCK_C,
            num_warps=_NUM_WARPS,
        )
    return out.to(values[0].dtype)


@register_op("srntt::_feature_swap_triton_backward")
def feature_swap_backward(
    grad_out: torch.Tensor,
    index: torch.Tensor,
    value_sizes: list[int],
    patch_size: int,
    stride: int,
    padding: int,
    scale: int,
    reduce: str,
) -> list[torch.Tensor]:
    """Adjoint of ``feature_swap`` w.r.t. each value map; deterministic (no atomics)."""
    b, cv, out_h, out_w = grad_out.shape
    gqh, gqw = index.shape[1:]
    gq = gqh * gqw
    value_hw = list(zip(value_sizes[0::2], value_sizes[1::2], strict=True))
    grids, nk_total = _key_grids(value_hw, patch_size, stride, padding, scale)
    # Inverse map: query cells sorted by matched key (stable, so increasing cell order within a
    # key) and CSR offsets csr[k] = number of cells matched to keys < k. Static shapes only.
    sorted_keys, cells = torch.sort(index.reshape(b, gq), dim=1, stable=True)
    bounds = torch.arange(nk_total + 1, device=index.device, dtype=index.dtype).expand(b, -1).contiguous()
    csr = torch.searchsorted(sorted_keys, bounds)
    count_h = _cover_counts(out_h, gqh, patch_size, stride, padding, scale, index.device)
    count_w = _cover_counts(out_w, gqw, patch_size, stride, padding, scale, index.device)
    # Heavy lists (> _CHUNK cells) in chunks: chunk_off[k] = chunks of heavy keys < k; chunk c
    # belongs to key chunk_key[c] (Nk_total past the last). NB: each heavy list adds at most one
    # partial chunk, and there are fewer than Gq / _CHUNK heavy lists, hence the static bound nc.
    n_cells = csr[:, 1:] - csr[:, :-1]
    chunks = torch.where(n_cells > _CHUNK, (n_cells + _CHUNK - 1) // _CHUNK, 0)
    chunk_off = torch.cat([torch.zeros_like(csr[:, :1]), chunks.cumsum(dim=1)], dim=1)
    nc = max(1, 2 * triton.cdiv(gq, _CHUNK))
    chunk_ids = torch.arange(nc, device=index.device).expand(b, -1).contiguous()
    chunk_key = torch.searchsorted(chunk_off[:, 1:].contiguous(), chunk_ids, right=True)
    win = patch_size * scale
    part = grad_out.new_empty((b, nc, cv, win * win), dtype=_torch_acc_dtype(grad_out.dtype))
    wblocks = triton.cdiv(win * win, _BLOCK_PIX)
    launch(_feature_swap_bwd_chunk_kernel, (nc * wblocks, triton.cdiv(cv, _BLOCK_C), b),
           grad_out, csr, cells, chunk_off, chunk_key, count_h, count_w, part,
           cv, out_h, out_w, gq, gqw, nk_total, nc, stride, padding, scale,
           WIN=win, CHUNK=_CHUNK, MEAN=reduce == "mean", ACC_DTYPE=_acc_dtype(part.dtype),
           BLOCK_PIX=_BLOCK_PIX, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS)
    grads = []
    for (hv, wv), (gkh, gkw, offset) in zip(value_hw, grids, strict=True):
        gv = grad_out.new_empty((b, cv, hv, wv))
        grid = (triton.cdiv(hv * wv, _BLOCK_PIX), triton.cdiv(cv, _BWD_BLOCK_C), b)
        launch(_feature_swap_bwd_kernel, grid,
               grad_out, csr, cells, chunk_off, part, count_h, count_w, gv,
               cv, hv, wv, out_h, out_w, gq, gqh, gqw, gkh, gkw, nk_total, nc, offset, stride, padding, scale,
               P=patch_size, T=-(-patch_size // stride), CHUNK=_CHUNK, MEAN=reduce == "mean",
               ACC_DTYPE=_acc_dtype(gv.dtype), BLOCK_PIX=_BLOCK_PIX, BLOCK_C=_BWD_BLOCK_C,
               num_warps=_NUM_WARPS)
        grads.append(gv)
    return grads
