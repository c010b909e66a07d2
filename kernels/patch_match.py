"""Fused patch matching in Triton: exact argmax of normalized patch cross-correlation.

Maths (docs/DESIGN.md, docs/CONTRACT.md §2): for query patch q and key patch k (descriptors of
``patch_size * patch_size * C`` values taken after zero padding),

    score(q, k) = <q, k> / (max(|q|, eps) * max(|k|, eps)),      eps = 1e-12,

and for every query patch we return the key index with the largest score (ties: smallest index,
counted over the concatenation of the key grids) and that score.

Layout. Every map is copied once into a zero-padded channels-last buffer (B, H + 2p, W + 2p, C),
so descriptor element (dy, dx, c) of the patch with top-left (y, x) sits at
``(y + dy) * row_stride + (x + dx) * C + c``: the dot products are an implicit GEMM read straight
from these buffers (no im2col), with K = patch_size^2 * C walked as patch_size^2 static taps times
BLOCK_K channel chunks. Inverse norms are precomputed per patch (O(N)). Each program owns BLOCK_M
query patches of one batch item and streams over the key patches in BLOCK_N tiles, keeping its
running max/argmax in registers; nothing N_query x N_key is ever written. Several keys are handled
by a host loop that carries the running state in (B, Nq) buffers.

Precision. float64 inputs score with fp64 multiply-and-sum (tl.dot has no fp64 path). For float32,
every precision finds candidates on tensor cores — TF32 for ``"highest"`` and ``"high"``, bf16 inputs
for ``"medium"`` — and then re-scores them in fp32, which keeps the contract provable (see
``_candidate_margin``), so even ``"highest"`` runs at tensor-core speed. The
exact fp32 scan (tl.dot with ``input_precision="ieee"``) remains for the re-scan of step 4 and for
``SRNTT_TRITON_EXACT_FP32=1``, which scores everything with it:

1. approximate pass: m~ = max over keys of the approximate score s~;
2. collect pass: every key with s~ >= m~ - 2 * delta is appended to the query's candidate list
   (at most ``_MAX_CANDIDATES``, in increasing key index, the number seen is counted);
3. the candidates are re-scored in fp32 (smallest index wins ties);
4. queries whose list overflowed (exact ties of flat regions, mostly) are re-scanned in fp32,
   packed into the first programs; only key tiles holding some key with s~ >= m~ - 2 * delta get
   exact dot products.
Since |s~ - s| <= delta for every key, the exact argmax always survives steps 2 and 4.
"""

import contextlib
import inspect
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops.geometry import EPS, grid_size
from ..ops.torch_backend import NEAR_ULPS, TIE_ULPS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Score float32 "highest" with exact fp32 dots everywhere instead of TF32 candidates + fp32 re-scoring.
EXACT_FP32 = os.environ.get("SRNTT_TRITON_EXACT_FP32") == "1"
# Candidates kept per query for fp32 re-scoring; queries with more fall back to an fp32 scan.
_MAX_CANDIDATES = 8 if INTERPRET else 32
_RESCORE_BLOCK_M = 64 if INTERPRET else 32
_RESCORE_BLOCK_K = 16 if INTERPRET else 32  # 64 spills on sm_90 (ptxas)
# Problems below this many (query, key) pairs per batch item run one fixed configuration: timing
# every autotune config (several compiles per kernel variant) would cost more than it saves.
_AUTOTUNE_MIN_PAIRS = 1 << 24
# Largest k of patch_match_topk, and the index of the empty slots of a running top-k.
MAX_TOPK = 64
_NO_INDEX: tl.constexpr = tl.constexpr(1 << 62)


def _is_traced(x) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(x, (FakeTensor, FunctionalTensor)) or (isinstance(x, torch.Tensor) and x.is_meta)


def launch_device(args) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among ``args`` (None when there is none)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)


def launch(kernel, grid, *args, **kwargs):
    """Launch a Triton kernel from inside a ``triton_op`` body, on the device of its tensors.

    NB: Triton launches on the current CUDA device and its current stream; tensors on ``cuda:1``
    while device 0 is current would fault or race with torch's stream, hence the device guard.
    Under ``TRITON_INTERPRET=1`` the kernel body runs in Python on host memory, so FakeTensors
    and FunctionalTensors (opcheck, torch.compile tracing) cannot be passed to it; there the launch
    is skipped, as the outputs' metadata is fixed by the host code alone. On a GPU, ``wrap_triton``
    makes the launch traceable.
    """
    if INTERPRET:
        if any(_is_traced(a) for a in (*args, *kwargs.values())):
            return
        kernel[grid](*args, **kwargs)
        return
    device = launch_device(args)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        wrap_triton(kernel)[grid](*args, **kwargs)


def register_op(name: str):
    """Register a Triton-backed function as the custom op ``name`` (its fake kernel is the same function).

    NB: on a GPU this is ``torch.library.triton_op``, so torch.compile sees the kernels through
    ``wrap_triton``. Under ``TRITON_INTERPRET=1`` a ``triton_op`` runs eagerly on CPU tensors, but
    ``wrap_triton`` hands back the bare interpreted function, so AOT tracing records no kernel
    launch and a compiled graph returns uninitialized outputs (opcheck's test_aot_dispatch_dynamic
    fails). There the op is an opaque ``torch.library.custom_op`` instead.
    """

    def register(fn):
        if not INTERPRET:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register


def _padded_channels_last(x: torch.Tensor, padding: int, dtype: torch.dtype) -> torch.Tensor:
    b, c, h, w = x.shape
    out = x.new_zeros((b, h + 2 * padding, w + 2 * padding, c), dtype=dtype)
    out[:, padding : padding + h, padding : padding + w].copy_(x.permute(0, 2, 3, 1))
    return out


def _patch_sq_norms(
    x: torch.Tensor, patch_size: int, stride: int, padding: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Squared descriptor norms, (B, G_h * G_w), in ``dtype`` (default x's; O(N) memory: no
    C-sized temporary).

    NB: a window sum by pooling (divisor 1) is a plain fixed-order sum in x's dtype; a conv2d with
    a ones filter may run on TF32 or Winograd/FFT engines (cuDNN allows TF32 by default), whose
    norms put most scores more than 1e-5 off.
    """
    if dtype is None or dtype == x.dtype:
        sq = torch.linalg.vector_norm(x, dim=1, keepdim=True).square()
    else:
        # Squares summed in ``dtype`` a few channels at a time: no full-size copy of x in it.
        sq = sum(x[:, c : c + 16].to(dtype).square().sum(1, keepdim=True) for c in range(0, x.shape[1], 16))
    sq = F.pad(sq, (padding,) * 4)
    return F.avg_pool2d(sq, patch_size, stride=stride, divisor_override=1).flatten(1)


def _inv_norms(sq_norms: torch.Tensor) -> torch.Tensor:
    return 1.0 / sq_norms.sqrt().clamp_min(EPS)


def _candidate_margin(k_total: int, precision: str) -> float:
    """delta with |s~ - s| <= delta for every pair, s~ the tensor-core score.

    NB: rounding each input to u (relative) perturbs each product by <= (2u + u^2)|q_i k_i|, and
    sum_i |q_i k_i| <= |q| |k| (Cauchy-Schwarz), so after normalization the input error is
    <= 2u + u^2. fp32 accumulation over K terms adds <= K * 2^-24 * (1 + u)^2 per unit; it is taken
    4x to cover tensor-core adders that truncate instead of rounding. The two norm scalings add
    a few ulps. TF32 is taken as truncating (u = 2^-10), bf16 rounds to nearest (u = 2^-8).
    """
    u = {"highest": 2.0**-10, "high": 2.0**-10, "medium": 2.0**-8}[precision]
    ulp = 2.0**-24
    return 2 * u + u * u + 4 * k_total * ulp * (1 + u) ** 2 + 8 * ulp


@triton.jit
def _patch_dot_tile(
    q_ptr,
    k_ptr,
    q_rows,
    k_rows,
    m_mask,
    n_mask,
    C,
    q_sy,
    k_sy,
    acc,
    P: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FMA: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[m, n] += <query patch m, key patch n>; q_rows / k_rows are element offsets of the patches'
    top-left corners in the padded channels-last maps."""
    offs_k = tl.arange(0, BLOCK_K)
    n_chunks = tl.cdiv(C, BLOCK_K)
    # One flat loop over (tap, channel chunk) rather than static taps around a short channel loop:
    # with C = 256 the channel loop alone has too few iterations to software-pipeline.
    for kk in range(0, P * P * n_chunks):
        tap = kk // n_chunks
        dy = tap // P
        dx = tap - dy * P
        cc = (kk - tap * n_chunks) * BLOCK_K + offs_k
        c_mask = cc < C
        q_off = q_rows + dy * q_sy + dx * C
        k_off = k_rows + dy * k_sy + dx * C
        a = tl.load(q_ptr + q_off[:, None] + cc[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(k_ptr + k_off[None, :] + cc[:, None], mask=n_mask[None, :] & c_mask[:, None], other=0.0)
        if FMA:
            # float32 operands into a float64 accumulator: their products are exact in float64.
            acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
        else:
            if UPCAST:
                # NB: the interpreter's bf16 tl.dot is wrong; exact products of the rounded
                # inputs with fp32 accumulation is what the tensor cores compute.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _update_best(score, best, best_idx, first_col):
    """Running max/argmax over key tiles that come in increasing key order: a strict '>' keeps the
    smallest index on ties (tl.argmax breaks ties within the tile the same way)."""
    tile_best = tl.max(score, axis=1)
    tile_idx = tl.argmax(score, axis=1, tie_break_left=True)
    better = tile_best > best
    best = tl.where(better, tile_best, best)
    best_idx = tl.where(better, tile_idx.to(tl.int64) + first_col, best_idx)
    return best, best_idx


@triton.jit
def _topk_merge(score, cols, top_v, top_i, K: tl.constexpr):
    """Running top-K per row: (top_v, top_i) (BLOCK_M, KP) holds the K best (value, index) pairs seen
    (unordered; slots past K hold +inf and are never replaced). Up to K times, the tile's best pair
    (largest value, then smallest index) replaces the worst kept pair if it is better."""
    idx = cols[None, :] + tl.zeros(score.shape, dtype=tl.int64)
    lo = tl.min(top_v, axis=1)
    score = tl.where(score >= lo[:, None], score, float("-inf"))
    n = tl.minimum(tl.max(tl.sum((score > float("-inf")).to(tl.int32), axis=1), axis=0), K)
    for _ in range(0, n):
        m = tl.max(score, axis=1)
        mi = tl.min(tl.where(score == m[:, None], idx, _NO_INDEX), axis=1)
        lo = tl.min(top_v, axis=1)
        li = tl.max(tl.where(top_v == lo[:, None], top_i, -1), axis=1)
        take = (m > float("-inf")) & ((m > lo) | ((m == lo) & (mi < li)))
        slot = (top_v == lo[:, None]) & (top_i == li[:, None]) & take[:, None]
        top_v = tl.where(slot, m[:, None], top_v)
        top_i = tl.where(slot, mi[:, None], top_i)
        score = tl.where(idx == mi[:, None], float("-inf"), score)
    return top_v, top_i


@triton.jit
def _patch_match_scan_kernel(
    q_ptr,
    k_ptr,
    ql_ptr,
    kl_ptr,
    qinv_ptr,
    kinv_ptr,
    best_val_ptr,
    best_idx_ptr,
    thr_ptr,
    count_ptr,
    cand_ptr,
    order_ptr,
    active_ptr,
    C,
    Gq,
    Gqw,
    Gk,
    Gkw,
    q_sb,
    q_sy,
    k_sb,
    k_sy,
    stride,
    key_offset,
    P: tl.constexpr,
    COLLECT: tl.constexpr,
    SELECT: tl.constexpr,
    PRUNE: tl.constexpr,
    KC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FMA: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One key map against BLOCK_M query patches of batch item program_id(1).

    TOPK > 0 (not with COLLECT): best_val/best_idx are (B, Gq, KP) running top-K states
    (:func:`_topk_merge`) instead of one running max/argmax.

    COLLECT=False: running max/argmax, read from and written back to best_val/best_idx.
    COLLECT=True: append every key with score >= thr to the query's candidate list (cand, count).
    SELECT=True: rows are the queries order[b, row]; only those with active != 0 are scanned, and
    programs with no active row skip the key loop.
    PRUNE=True (running max, exact): a key tile is first scored in TF32 / bf16 from ql / kl; keys
    below thr cannot be the argmax and are dropped, and the exact dot products (q, k, DOT_PREC) are
    computed only for tiles where some key is at or above thr.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rows < Gq
    if SELECT:
        qid = tl.load(order_ptr + b * Gq + rows, mask=m_mask, other=0)
        m_mask = m_mask & (tl.load(active_ptr + b * Gq + qid, mask=m_mask, other=0) != 0)
        n_end = tl.where(tl.max(m_mask.to(tl.int32), axis=0) > 0, Gk, 0)
    else:
        qid = rows.to(tl.int64)
        n_end = Gk
    state = b * Gq + qid
    q_rows = b * q_sb + (qid // Gqw) * stride * q_sy + (qid % Gqw) * stride * C
    qinv = tl.load(qinv_ptr + state, mask=m_mask, other=0.0)
    acc_dtype = qinv_ptr.dtype.element_ty
    if COLLECT or PRUNE:
        thr = tl.load(thr_ptr + state, mask=m_mask, other=float("inf"))
    if COLLECT:
        count = tl.load(count_ptr + state, mask=m_mask, other=0)
    elif TOPK > 0:
        top_at = state[:, None] * KP + tl.arange(0, KP)[None, :]
        top_v = tl.load(best_val_ptr + top_at, mask=m_mask[:, None], other=float("-inf"))
        top_i = tl.load(best_idx_ptr + top_at, mask=m_mask[:, None], other=0)
    else:
        best = tl.load(best_val_ptr + state, mask=m_mask, other=float("-inf"))
        best_idx = tl.load(best_idx_ptr + state, mask=m_mask, other=0)
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = cols < Gk
        k_rows = b * k_sb + (cols // Gkw) * stride * k_sy + (cols % Gkw) * stride * C
        kinv = tl.load(kinv_ptr + b * Gk + cols, mask=n_mask, other=0.0)
        if PRUNE:
            approx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            approx = _patch_dot_tile(
                ql_ptr,
                kl_ptr,
                q_rows,
                k_rows,
                m_mask,
                n_mask,
                C,
                q_sy,
                k_sy,
                approx,
                P,
                "tf32",
                UPCAST,
                False,
                BLOCK_K,
            )
            hit = (approx * qinv[:, None] * kinv[None, :] >= thr[:, None]) & n_mask[None, :] & m_mask[:, None]
            if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
                acc = _patch_dot_tile(
                    q_ptr,
                    k_ptr,
                    q_rows,
                    k_rows,
                    m_mask,
                    n_mask,
                    C,
                    q_sy,
                    k_sy,
                    acc,
                    P,
                    DOT_PREC,
                    False,
                    FMA,
                    BLOCK_K,
                )
                score = tl.where(hit, acc * qinv[:, None] * kinv[None, :], float("-inf"))
                if TOPK > 0:
                    top_v, top_i = _topk_merge(score, cols + key_offset, top_v, top_i, TOPK)
                else:
                    best, best_idx = _update_best(score, best, best_idx, n0 + key_offset)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            acc = _patch_dot_tile(
                q_ptr,
                k_ptr,
                q_rows,
                k_rows,
                m_mask,
                n_mask,
                C,
                q_sy,
                k_sy,
                acc,
                P,
                DOT_PREC,
                UPCAST,
                FMA,
                BLOCK_K,
            )
            score = tl.where(n_mask[None, :], acc * qinv[:, None] * kinv[None, :], float("-inf"))
            if COLLECT:
                hit = (score >= thr[:, None]) & n_mask[None, :] & m_mask[:, None]
                hit_i = hit.to(tl.int32)
                pos = count[:, None] + tl.cumsum(hit_i, axis=1) - 1
                # NB: int32 offsets within the batch item (the host keeps Gq * KC < 2^31): a 2D
                # tile of 64-bit offsets spills registers on sm_90.
                tl.store(
                    cand_ptr + b * Gq * KC + (qid.to(tl.int32) * KC)[:, None] + pos,
                    (cols + key_offset).to(tl.int32)[None, :] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
                    mask=hit & (pos < KC),
                )
                count += tl.sum(hit_i, axis=1)
            elif TOPK > 0:
                top_v, top_i = _topk_merge(score, cols + key_offset, top_v, top_i, TOPK)
            else:
                best, best_idx = _update_best(score, best, best_idx, n0 + key_offset)
    if COLLECT:
        tl.store(count_ptr + state, count, mask=m_mask)
    elif TOPK > 0:
        tl.store(best_val_ptr + top_at, top_v, mask=m_mask[:, None])
        tl.store(best_idx_ptr + top_at, top_i, mask=m_mask[:, None])
    else:
        tl.store(best_val_ptr + state, best, mask=m_mask)
        tl.store(best_idx_ptr + state, best_idx, mask=m_mask)


@triton.jit
def _patch_match_rescore_kernel(
    q_ptr,
    k_ptr,
    qinv_ptr,
    kinv_ptr,
    best_val_ptr,
    best_idx_ptr,
    count_ptr,
    cand_ptr,
    cscore_ptr,
    sel_ptr,
    C,
    Gq,
    Gqw,
    Gk,
    Gkw,
    q_sb,
    q_sy,
    k_sb,
    k_sy,
    stride,
    key_offset,
    tie,
    P: tl.constexpr,
    KC: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Scores of the candidates that fall in this key map; updates the running max/argmax and writes
    each candidate's score to cscore.

    F64=False: every listed candidate (the first min(count, KC)) in fp32. F64=True: the candidates
    with sel != 0, in float64 (the float32 operands' products are exact there), with best_val,
    cscore and the inverse norms in float64; scores within ``tie`` of the best so far are exact
    ties and keep the smaller index.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rows < Gq
    state = b * Gq + rows
    # NB: int64, as (rows // Gqw) * stride * q_sy nears 2^31 at an 8K relu1_1 map.
    qid = rows.to(tl.int64)
    q_rows = b * q_sb + (qid // Gqw) * stride * q_sy + (qid % Gqw) * stride * C
    qinv = tl.load(qinv_ptr + state, mask=m_mask, other=0.0)
    if F64:
        n_cand = tl.where(m_mask, KC, 0)
    else:
        n_cand = tl.minimum(tl.load(count_ptr + state, mask=m_mask, other=0), KC)
    best = tl.load(best_val_ptr + state, mask=m_mask, other=float("-inf"))
    best_idx = tl.load(best_idx_ptr + state, mask=m_mask, other=0)
    acc_dtype = qinv_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    n_chunks = tl.cdiv(C, BLOCK_K)
    for j in range(0, tl.max(n_cand, axis=0)):
        valid = m_mask & (j < n_cand)
        if F64:
            valid = valid & (tl.load(sel_ptr + state * KC + j, mask=valid, other=0) != 0)
        loc = tl.load(cand_ptr + state * KC + j, mask=valid, other=0).to(tl.int64) - key_offset
        valid = valid & (loc >= 0) & (loc < Gk)
        loc = tl.where(valid, loc, 0)
        k_rows = b * k_sb + (loc // Gkw) * stride * k_sy + (loc % Gkw) * stride * C
        acc = tl.zeros((BLOCK_M,), dtype=acc_dtype)
        # One flat loop over (tap, channel chunk): unrolled taps keep P*P sets of 64-bit row
        # offsets live and spill on sm_90.
        for t in range(0, P * P * n_chunks):
            tap = t // n_chunks
            dy = tap // P
            dx = tap - dy * P
            cc = (t - tap * n_chunks) * BLOCK_K + offs_k
            mask = valid[:, None] & (cc < C)[None, :]
            a = tl.load(q_ptr + (q_rows + dy * q_sy + dx * C)[:, None] + cc[None, :], mask=mask, other=0.0)
            kk = tl.load(k_ptr + (k_rows + dy * k_sy + dx * C)[:, None] + cc[None, :], mask=mask, other=0.0)
            acc += tl.sum(a.to(acc_dtype) * kk.to(acc_dtype), axis=1)
        kinv = tl.load(kinv_ptr + b * Gk + loc, mask=valid, other=0.0)
        score = acc * qinv * kinv
        tl.store(cscore_ptr + state * KC + j, score, mask=valid)
        # Candidates come in increasing key index: strict '>' keeps the smallest on ties.
        better = valid & (score > best + tie)
        best = tl.where(better, score, best)
        best_idx = tl.where(better, loc + key_offset, best_idx)
    tl.store(best_val_ptr + state, best, mask=m_mask)
    tl.store(best_idx_ptr + state, best_idx, mask=m_mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the scan per mode ("max", "collect",
# "prune"): the first is the fixed config of small problems, all are autotuned on large ones.
# Hopper-oriented: 128-wide tiles keep the tensor cores fed from L2 (arithmetic intensity
# BM*BN/(BM+BN) flop/byte), 32-channel K chunks with 3-4 pipeline stages. Only configs without
# register spills on sm_90 (ptxas, `make gpu-compile-check`) are offered: the collect mode keeps a
# tile of candidate positions and the prune mode two accumulators, so they get smaller tiles.
SCAN_CONFIGS = {
    "max": ((64, 64, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 8, 3)),
    "collect": ((64, 64, 32, 8, 3), (128, 64, 32, 8, 3)),
    "prune": ((64, 32, 32, 8, 3),),
    # A running top-k keeps a (BLOCK_M, KP) state of values and indices beside the tile: a narrow
    # key tile and two stages leave it registers for every KP up to 64 (64x64x32 in 3 stages
    # spilled at KP 2 on sm_80, in 2 stages at KP 16 with bf16).
    "topk": ((64, 32, 32, 8, 2),),
}
# Configs that spill registers on an arch family (ptxas, `make gpu-compile-check`): not offered
# there. sm_8x has the 255-register cap of sm_90 but no wgmma, whose accumulators live in fewer
# registers per thread.
SCAN_SPILLS = {8: {"max": {(128, 128, 32, 8, 4)}}}
# Shared memory per block (bytes) of the archs the launcher knows; others get the smallest.
SMEM_LIMITS = {
    (8, 0): 163 << 10,
    (8, 6): 99 << 10,
    (8, 9): 99 << 10,
    (9, 0): 227 << 10,
    (10, 0): 227 << 10,
    (12, 0): 99 << 10,
}
# The first tuned call of a mode times every config on at most this many query x key patches
# (enough query rows to fill the GPU), then the choice is cached across processes.
_TUNE_QUERIES = 1 << 15
_TUNE_KEYS = 1 << 11


def scan_mode(collect: bool, prune: bool, topk: bool = False) -> str:
    return "topk" if topk else ("prune" if prune else ("collect" if collect else "max"))


def scan_smem_bytes(
    block_m: int, block_n: int, block_k: int, stages: int, operand_bytes: int, mode: str
) -> int:
    """Upper bound of the scan's shared memory: pipelined A and B tiles (two dots in prune mode)."""
    return stages * (block_m + block_n) * block_k * operand_bytes * (2 if mode == "prune" else 1)


def scan_configs(smem_limit: int, operand_bytes: int, mode: str, arch: tuple | None = None) -> list:
    """The configs of ``mode`` that fit ``smem_limit`` bytes of shared memory and do not spill on
    ``arch`` (compute capability; None: any), the first always kept."""
    first, *rest = SCAN_CONFIGS[mode]
    spills = SCAN_SPILLS.get(arch[0], {}).get(mode, set()) if arch else set()
    fits = [first] + [c for c in rest if scan_smem_bytes(*c[:3], c[4], operand_bytes, mode) <= smem_limit
                      and c not in spills]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in fits
    ]


def _device_smem_limit(device: torch.device) -> int:
    return SMEM_LIMITS.get(torch.cuda.get_device_capability(device), min(SMEM_LIMITS.values()))


def _config_key(c) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _prune_configs(configs, named_args, **kwargs):
    """Autotune hook: only the configs of the scan mode that fit the device's shared memory."""
    q = named_args["q_ptr"]
    operand_bytes = 2 if named_args["ql_ptr"].dtype == torch.bfloat16 else q.element_size()
    mode = scan_mode(bool(kwargs.get("COLLECT")), bool(kwargs.get("PRUNE")), bool(kwargs.get("TOPK")))
    arch = torch.cuda.get_device_capability(q.device)
    keep = {_config_key(c) for c in scan_configs(_device_smem_limit(q.device), operand_bytes, mode, arch)}
    return [c for c in configs if _config_key(c) in keep]


_patch_match_scan_tuned = triton.autotune(
    configs=list({_config_key(c): c for m in SCAN_CONFIGS for c in scan_configs(1 << 30, 4, m)}.values()),
    # Not keyed on the grid sizes: the first call of a mode is tuned on a capped sub-problem
    # (_tune_capped) and its choice holds for every size.
    key=["C", "P", "COLLECT", "SELECT", "PRUNE", "DOT_PREC", "UPCAST", "TOPK", "KP", "KC"],
    prune_configs_by={"early_config_prune": _prune_configs},
    # The scan reads and writes its running state: restore it after every timing run.
    restore_value=["best_val_ptr", "best_idx_ptr", "count_ptr", "cand_ptr"],
    # Timings go to Triton's cache folder: later processes reuse the choice without timing.
    **({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}),
)(_patch_match_scan_kernel)
_TUNED: set = set()


def _tune_capped(args: tuple, meta: dict) -> None:
    """Tune the scan once per mode on a capped sub-problem, on scratch copies of its state.

    The autotuner's key leaves out the grid sizes, so the real launch that follows reuses the
    choice; tuning it on a 4K map instead would time every config at full size.
    """
    key = (args[0].device, args[0].dtype, args[2].dtype, *sorted(meta.items()))
    if key in _TUNED or _is_traced(args[0]):
        return
    args = list(args)
    for i in (6, 7, 9, 10):  # best_val, best_idx, count, cand: the buffers the scan writes
        args[i] = args[i].clone()
    gq, gk = min(args[14], _TUNE_QUERIES), min(args[16], _TUNE_KEYS)
    args[14], args[16] = gq, gk

    def grid(m):
        return (triton.cdiv(gq, m["BLOCK_M"]), 1)  # batch item 0 only

    launch(_patch_match_scan_tuned, grid, *args, **meta)
    _TUNED.add(key)


class _Map:
    """A feature map prepared for matching: padded channels-last buffer, grid, inverse norms."""

    def __init__(self, x: torch.Tensor, patch_size: int, stride: int, padding: int, dtype: torch.dtype):
        self.batch, self.channels, h, w = x.shape
        self.gh = grid_size(h, patch_size, stride, padding)
        self.gw = grid_size(w, patch_size, stride, padding)
        self.n = self.gh * self.gw
        self.sq_norms = _patch_sq_norms(x, patch_size, stride, padding)
        self.inv_norms = _inv_norms(self.sq_norms)
        self.buf = _padded_channels_last(x, padding, dtype)
        self.low = self.buf
        self.patch_size, self.stride = patch_size, stride
        self._x, self._geometry = x, (patch_size, stride, padding)
        self._inv64 = None

    def inv_norms64(self) -> torch.Tensor:
        """Inverse norms in float64, computed on first use (near-tie re-scoring only)."""
        if self._inv64 is None:
            self._inv64 = _inv_norms(_patch_sq_norms(self._x, *self._geometry, dtype=torch.float64))
        return self._inv64

    def strides(self):
        return self.buf.stride(0), self.buf.stride(1)


def fma_config(prune_16bit: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the CUDA-core (float64 / FMA) scan.

    NB: float64 has no tensor-core path; small fixed tiles keep the (M, K, N) product small. A
    prune from 16-bit (bf16) operands is a tensor-core dot, which needs BLOCK_K >= 16. The float64
    (M, K, N) product and a running top-64 need 8 warps' registers: with 4 warps the re-scans
    spilled 184-408 bytes (ptxas, sm_80 and sm_90).
    """
    return (32, 32, 16 if prune_16bit else 8, 8, 1)


def _scan(query, key, key_offset, state, patch_size, stride, dot_prec, low, collect=None, select=None,
          prune=None, exact64=False, topk=0):
    """One launch of the scan kernel over one key map (see its docstring for the modes).

    exact64: score in float64 on CUDA cores (state and inverse norms in float64) from the float32
    buffers. topk > 0: state is a running top-k, (B, Gq, KP) each.
    """
    best_val, best_idx = state
    q_buf, k_buf = (query.low, key.low) if low else (query.buf, key.buf)
    fma = q_buf.dtype == torch.float64 or exact64
    q_inv, k_inv = (query.inv_norms64(), key.inv_norms64()) if exact64 else (query.inv_norms, key.inv_norms)
    dummy_i32 = best_idx.new_empty((1,), dtype=torch.int32)
    thr, count, cand = collect if collect is not None else (best_val, dummy_i32, dummy_i32)
    if prune is not None:
        thr = prune
    order, active = select if select is not None else (best_idx, dummy_i32)
    args = (q_buf, k_buf, query.low, key.low, q_inv, k_inv, best_val, best_idx, thr, count, cand, order,
            active)
    args += (query.channels, query.n, query.gw, key.n, key.gw, *query.strides(), *key.strides(), stride,
             key_offset)
    meta = dict(P=patch_size, COLLECT=collect is not None, SELECT=select is not None, PRUNE=prune is not None,
                KC=cand.shape[-1] if collect is not None else _MAX_CANDIDATES, DOT_PREC=dot_prec,
                UPCAST=INTERPRET and query.low.dtype == torch.bfloat16, FMA=fma, TOPK=topk,
                KP=best_val.shape[-1] if topk else 1)
    if INTERPRET:
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16)
    elif fma:
        bm, bn, bk, warps, stages = fma_config(prune is not None and query.low.element_size() == 2)
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    elif query.n * key.n < _AUTOTUNE_MIN_PAIRS:
        mode = scan_mode(collect is not None, prune is not None, topk > 0)
        bm, bn, bk, warps, stages = SCAN_CONFIGS[mode][0]
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    else:
        blocks = None
    if blocks is not None:
        grid = (triton.cdiv(query.n, blocks["BLOCK_M"]), query.batch)
        launch(_patch_match_scan_kernel, grid, *args, **meta, **blocks)
    else:

        def grid(meta):
            return (triton.cdiv(query.n, meta["BLOCK_M"]), query.batch)

        _tune_capped(args, meta)
        launch(_patch_match_scan_tuned, grid, *args, **meta)


def _rescore(q, ks, offsets, state, count, cand, cscore, sel):
    """Re-scores the candidate lists against every key map, scores into cscore: all of them in fp32
    (sel None), or those marked in sel in float64 (state and cscore in float64)."""
    best_val, best_idx = state
    f64 = sel is not None
    q_inv = q.inv_norms64() if f64 else q.inv_norms
    tie = TIE_ULPS * torch.finfo(torch.float64).eps if f64 else 0.0
    grid = (triton.cdiv(q.n, _RESCORE_BLOCK_M), q.batch)
    for k, off in zip(ks, offsets, strict=False):
        launch(
            _patch_match_rescore_kernel,
            grid,
            q.buf,
            k.buf,
            q_inv,
            k.inv_norms64() if f64 else k.inv_norms,
            best_val,
            best_idx,
            count,
            cand,
            cscore,
            sel if f64 else count,
            q.channels,
            q.n,
            q.gw,
            k.n,
            k.gw,
            *q.strides(),
            *k.strides(),
            q.stride,
            off,
            tie,
            P=q.patch_size,
            KC=cand.shape[-1],
            F64=f64,
            BLOCK_M=_RESCORE_BLOCK_M,
            BLOCK_K=_RESCORE_BLOCK_K,
        )


@register_op("srntt::_patch_match_triton")
def patch_match(
    query: torch.Tensor, keys: list[torch.Tensor], patch_size: int, stride: int, padding: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best key patch per query patch: (index int64 (B, Gq_h, Gq_w), score (B, Gq_h, Gq_w))."""
    n_query = grid_size(query.shape[2], patch_size, stride, padding) * grid_size(
        query.shape[3], patch_size, stride, padding
    )
    if n_query * _MAX_CANDIDATES >= 1 << 31:
        raise ValueError(
            f"query: {n_query} patches per map; the Triton kernels take fewer than "
            f"{(1 << 31) // _MAX_CANDIDATES}"
        )
    fast = query.dtype == torch.float32 and not EXACT_FP32
    q = _Map(query, patch_size, stride, padding, query.dtype)
    ks = [_Map(k, patch_size, stride, padding, query.dtype) for k in keys]
    offsets = [0]
    for k in ks:
        offsets.append(offsets[-1] + k.n)
    best_val = query.new_full((q.batch, q.n), float("-inf"))
    best_idx = query.new_zeros((q.batch, q.n), dtype=torch.int64)
    state = (best_val, best_idx)
    if not fast:
        for k, off in zip(ks, offsets, strict=False):
            _scan(q, k, off, state, patch_size, stride, "ieee", low=False)
    else:
        # bf16 operands ignore input_precision; "tf32" is Triton's own default for every dot.
        dot_prec = "tf32"
        if precision == "medium":
            for m in (q, *ks):
                m.low = m.buf.to(torch.bfloat16)
        for k, off in zip(ks, offsets, strict=False):
            _scan(q, k, off, state, patch_size, stride, dot_prec, low=True)
        delta = _candidate_margin(patch_size * patch_size * q.channels, precision)
        # Keys within `near` of the fp32 best are re-scored in float64: the collect threshold leaves
        # room for them.
        near = NEAR_ULPS * torch.finfo(torch.float32).eps
        thr = best_val - 2 * delta - near
        count = torch.zeros_like(best_idx, dtype=torch.int32)
        cand = best_idx.new_empty((q.batch, q.n, _MAX_CANDIDATES), dtype=torch.int32)
        for k, off in zip(ks, offsets, strict=False):
            _scan(q, k, off, state, patch_size, stride, dot_prec, low=True, collect=(thr, count, cand))
        best_val.fill_(float("-inf"))
        best_idx.zero_()
        cscore = best_val.new_full((q.batch, q.n, _MAX_CANDIDATES), float("-inf"))
        _rescore(q, ks, offsets, state, count, cand, cscore, None)
        # NB: a zero query patch scores exactly 0 against every key, so its list overflows but its
        # first candidate (key 0) is already the exact answer.
        overflow = (count > _MAX_CANDIDATES) & (q.sq_norms > 0)
        # Near ties among the listed candidates: those within `near` of the fp32 best, in float64.
        sel = (cscore >= (best_val - near)[..., None]) & ~overflow[..., None]
        tied = sel.sum(dim=2) > 1
        sel &= tied[..., None]
        state64 = (best_val.new_full(best_val.shape, float("-inf"), dtype=torch.float64), best_idx.clone())
        _rescore(q, ks, offsets, state64, count, cand, cscore.double(), sel.to(torch.int8))
        # Overflowing queries first, so that they are packed into the first programs. Their float64
        # scan skips the key tiles where no key reaches thr (typically flat, tied regions remain).
        order = torch.argsort(overflow.to(torch.int32), dim=1, descending=True, stable=True)
        active = overflow.to(torch.int32)
        for k, off in zip(ks, offsets, strict=False):
            _scan(q, k, off, state64, patch_size, stride, "ieee", low=False, select=(order, active),
                  prune=thr, exact64=True)
        redo = tied | overflow
        best_val.copy_(torch.where(redo, state64[0].to(best_val.dtype), best_val))
        best_idx.copy_(torch.where(redo, state64[1], best_idx))
    shape = (q.batch, q.gh, q.gw)
    return best_idx.view(shape), best_val.view(shape)


def _topk_state(batch: int, n: int, k: int, dtype: torch.dtype, device) -> tuple:
    """An empty running top-k: k slots at -inf, the padding slots (up to a power of two) at +inf so
    that they are never replaced; every slot a distinct out-of-range index."""
    kp = triton.next_power_of_2(max(k, 2))
    slots = torch.arange(kp, device=device)
    val = torch.where(slots < k, float("-inf"), float("inf")).to(dtype).expand(batch, n, kp).contiguous()
    idx = (slots + (1 << 62)).expand(batch, n, kp).contiguous()
    return val, idx


def _sorted_topk(val: torch.Tensor, idx: torch.Tensor, k: int) -> tuple:
    """The k best (value, index) pairs along the last dim: value descending, ties by smallest index.
    A running top-k state's padding slots are its last ones: pass ``state[..., :k]``."""
    idx, order = torch.sort(idx, dim=-1, stable=True)
    val, order = torch.sort(val.gather(-1, order), dim=-1, descending=True, stable=True)
    return idx.gather(-1, order)[..., :k], val[..., :k]


def _check_topk(query: torch.Tensor, keys: list, patch_size: int, stride: int, padding: int, k: int) -> None:
    geometry = (patch_size, stride, padding)
    n_keys = sum(grid_size(x.shape[2], *geometry) * grid_size(x.shape[3], *geometry) for x in keys)
    if not 1 <= k <= min(MAX_TOPK, n_keys):
        raise ValueError(f"k: must be in [1, {min(MAX_TOPK, n_keys)}] (the Triton kernels keep at most "
                         f"{MAX_TOPK}, and there are {n_keys} key patches); got {k}")


@register_op("srntt::_patch_match_topk_triton")
def patch_match_topk(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    patch_size: int,
    stride: int,
    padding: int,
    precision: str,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best key patches per query patch: (index int64 (B, Gq_h, Gq_w, k), score (B, Gq_h, Gq_w, k)),
    by score descending, ties by smallest index.

    float32: running top-k of the tensor-core scores, then every key within 2 * delta (+ the float64
    near-tie band) of the k-th of them is a candidate (|s~ - s| <= delta keeps every true top-k key
    among them); candidates are scored in fp32, those within the near-tie band of the k-th fp32
    score again in float64, which orders them. Queries with more candidates than a list holds get a
    float64 top-k scan over the key tiles that hold candidates. float64: an exact top-k scan.
    """
    _check_topk(query, keys, patch_size, stride, padding, k)
    q = _Map(query, patch_size, stride, padding, query.dtype)
    ks = [_Map(x, patch_size, stride, padding, query.dtype) for x in keys]
    offsets = [0]
    for m in ks:
        offsets.append(offsets[-1] + m.n)
    shape = (q.batch, q.gh, q.gw, k)
    if query.dtype != torch.float32 or EXACT_FP32:
        state = _topk_state(q.batch, q.n, k, query.dtype, query.device)
        for m, off in zip(ks, offsets, strict=False):
            _scan(q, m, off, state, patch_size, stride, "ieee", low=False, topk=k)
        index, score = _sorted_topk(state[0][..., :k], state[1][..., :k], k)
        return index.view(shape), score.view(shape)
    if precision == "medium":
        for m in (q, *ks):
            m.low = m.buf.to(torch.bfloat16)
    approx = _topk_state(q.batch, q.n, k, torch.float32, query.device)
    for m, off in zip(ks, offsets, strict=False):
        _scan(q, m, off, approx, patch_size, stride, "tf32", low=True, topk=k)
    delta = _candidate_margin(patch_size * patch_size * q.channels, precision)
    near = NEAR_ULPS * torch.finfo(torch.float32).eps
    thr = (approx[0][..., :k].amin(dim=-1) - 2 * delta - near).contiguous()
    kc = _MAX_CANDIDATES + k
    count = torch.zeros((q.batch, q.n), dtype=torch.int32, device=query.device)
    cand = count.new_empty((q.batch, q.n, kc))
    unused = (thr.new_empty(thr.shape), torch.zeros_like(count, dtype=torch.int64))
    for m, off in zip(ks, offsets, strict=False):
        _scan(q, m, off, unused, patch_size, stride, "tf32", low=True, collect=(thr, count, cand))
    cscore = thr.new_full((q.batch, q.n, kc), float("-inf"))
    _rescore(q, ks, offsets, (unused[0].fill_(float("-inf")), unused[1]), count, cand, cscore, None)
    # NB: a zero query patch scores exactly 0 against every key: its first k candidates (keys
    # 0..k-1, in list order) are already its exact answer.
    overflow = (count > kc) & (q.sq_norms > 0)
    kth = cscore.topk(k, dim=-1).values[..., -1:]
    sel = (cscore >= kth - near) & ~overflow[..., None]
    cscore64 = cscore.double().masked_fill_(~sel, float("-inf"))
    best64 = (unused[0].double(), unused[1])
    _rescore(q, ks, offsets, best64, count, cand, cscore64, sel.to(torch.int8))
    listed = torch.where(torch.arange(kc, device=query.device) < count[..., None].clamp_max(kc),
                         cand.to(torch.int64), 1 << 62)
    index, score = _sorted_topk(cscore64, listed, k)
    # Overflowing queries first, packed into the first programs (the others skip the key loop).
    order = torch.argsort(overflow.to(torch.int32), dim=1, descending=True, stable=True)
    state = _topk_state(q.batch, q.n, k, torch.float64, query.device)
    for m, off in zip(ks, offsets, strict=False):
        _scan(q, m, off, state, patch_size, stride, "ieee", low=False,
              select=(order, overflow.to(torch.int32)), prune=thr, exact64=True, topk=k)
    o_index, o_score = _sorted_topk(state[0][..., :k], state[1][..., :k], k)
    index = torch.where(overflow[..., None], o_index, index)
    score = torch.where(overflow[..., None], o_score, score)
    return index.view(shape), score.float().view(shape)
