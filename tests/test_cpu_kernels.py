"""Low-level tests of the C++ CPU kernels (torch.ops.srntt._*_fused) against float64 references.

The references here are deliberately naive (full similarity matrix, Python loops over cells) and
only run on small shapes; the public-API contract tests live elsewhere.
"""

import glob
import os

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops():
    if hasattr(torch.ops.srntt, "_patch_match_fused"):
        return True
    libs = glob.glob(os.path.join(ROOT, "srntt_core", "_C*.so"))
    if not libs:
        return False
    torch.ops.load_library(libs[0])
    return True


pytestmark = pytest.mark.skipif(not _load_ops(), reason="srntt_core._C is not built")

EPS = 1e-12
# (atol on scores, top-2 margin above which indices must match exactly)
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-5)}


def patch_match_ref(query, keys, patch_size, stride, padding):
    """float64 exact search: returns (index, score, top-2 margin) over all key patches."""
    q = F.unfold(query.double(), patch_size, padding=padding, stride=stride)  # B, D, Nq
    q = q / q.norm(dim=1, keepdim=True).clamp_min(EPS)
    ks = []
    for key in keys:
        k = F.unfold(key.double(), patch_size, padding=padding, stride=stride)
        ks.append(k / k.norm(dim=1, keepdim=True).clamp_min(EPS))
    sim = torch.bmm(q.transpose(1, 2), torch.cat(ks, dim=2))  # B, Nq, Nk
    score, index = sim.max(dim=2)
    if sim.shape[2] > 1:
        top2 = sim.topk(2, dim=2).values
        margin = top2[..., 0] - top2[..., 1]
    else:
        margin = torch.full_like(score, float("inf"))
    grid = lambda n: (n + 2 * padding - patch_size) // stride + 1  # noqa: E731
    shape = (query.shape[0], grid(query.shape[2]), grid(query.shape[3]))
    return index.view(shape), score.view(shape), margin.view(shape), sim


def check_patch_match(query, keys, patch_size, stride, padding):
    index, score = torch.ops.srntt._patch_match_fused(query, keys, patch_size, stride, padding, "highest")
    ref_index, ref_score, margin, sim = patch_match_ref(query, keys, patch_size, stride, padding)
    atol, margin_tol = TOL[query.dtype]
    assert index.dtype == torch.int64 and index.shape == ref_index.shape
    assert score.dtype == query.dtype and score.shape == ref_score.shape
    torch.testing.assert_close(score.double(), ref_score, atol=atol, rtol=0)
    sure = margin > margin_tol
    assert torch.equal(index[sure], ref_index[sure])
    # Everywhere: the chosen key's exact score is within tolerance of the exact max.
    chosen = sim.gather(2, index.view(index.shape[0], -1, 1)).view(ref_score.shape)
    assert (ref_score - chosen).max().item() <= atol
    return index, score


def _features(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # ReLU-like features with zero pixels, as relu3_1 maps have.
    return torch.randn(*shape, generator=g, dtype=dtype).clamp_min(-0.3)


CASES = [
    # B, C, (Hq, Wq), [(Hk, Wk), ...], patch_size, stride, padding
    (1, 3, (7, 9), [(8, 6)], 3, 1, 0),
    (2, 5, (11, 13), [(9, 10)], 3, 1, 1),
    (1, 4, (10, 7), [(6, 6), (9, 12), (5, 3)], 3, 1, 0),
    (2, 3, (9, 9), [(7, 8), (10, 5)], 3, 1, 1),
    (1, 6, (13, 11), [(12, 9)], 3, 2, 0),
    (1, 2, (8, 10), [(7, 9)], 2, 3, 1),
    (2, 3, (6, 7), [(9, 5)], 1, 1, 0),
    (1, 3, (12, 9), [(10, 11)], 5, 1, 2),
    (1, 8, (23, 37), [(31, 19), (17, 40)], 3, 1, 0),
    (1, 17, (19, 21), [(18, 22)], 4, 1, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_patch_match_vs_reference(case, dtype):
    B, C, (hq, wq), key_sizes, p, s, pad = case
    query = _features(B, C, hq, wq, dtype=dtype, seed=0)
    keys = [_features(B, C, h, w, dtype=dtype, seed=1 + i) for i, (h, w) in enumerate(key_sizes)]
    check_patch_match(query, keys, p, s, pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_match_relu3_like_channels(dtype):
    query = _features(1, 256, 14, 11, dtype=dtype, seed=3)
    key = _features(1, 256, 12, 17, dtype=dtype, seed=4)
    for pad in (0, 1):
        check_patch_match(query, [key], 3, 1, pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", [0, 1])
def test_patch_match_finds_planted_patches(dtype, padding):
    # Key = query shifted: every interior query patch has an exact copy (score 1).
    base = _features(1, 7, 20, 24, dtype=dtype, seed=5)
    query, key = base[:, :, 2:18, 3:21], base[:, :, 4:20, :22]
    index, score = check_patch_match(query.contiguous(), [key.contiguous()], 3, 1, padding)
    if padding == 0:
        gk_w = key.shape[3] - 2
        i, j = torch.meshgrid(torch.arange(12), torch.arange(16), indexing="ij")
        expected = ((i + 0) * gk_w + (j + 3))[None]
        assert torch.equal(index[:, 2:14, :16][:, :12, :], expected[:, :12])
        torch.testing.assert_close(score[:, 2:14], torch.ones_like(score[:, 2:14]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1)])
def test_patch_match_ties_go_to_smallest_index(dtype, stride, padding):
    # A constant key: every key patch of the same padding pattern is the same vector.
    query = _features(2, 4, 7, 8, dtype=dtype, seed=6)
    key = torch.ones(2, 4, 9, 10, dtype=dtype)
    index, _ = torch.ops.srntt._patch_match_fused(query, [key, key.clone()], 3, stride, padding, "highest")
    ref_index = patch_match_ref(query, [key, key.clone()], 3, stride, padding)[0]
    # The reference's own rounding breaks the ties: map its pick to the first identical patch.
    desc = torch.cat([F.unfold(key, 3, padding=padding, stride=stride)] * 2, dim=2)  # B, D, Nk
    for b in range(2):
        picked = desc[b][:, ref_index[b].flatten()]  # D, Nq
        same = (desc[b][:, :, None] == picked[:, None, :]).all(dim=0)  # Nk, Nq
        first = same.int().argmax(dim=0)
        assert torch.equal(index[b].flatten(), first)
    if padding == 0:
        assert torch.all(index == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_match_zero_patches_score_zero(dtype):
    query = torch.zeros(1, 3, 6, 6, dtype=dtype)
    query[:, :, 4:, 4:] = 1.0
    key = _features(1, 3, 7, 7, dtype=dtype, seed=7)
    index, score = torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 0, "highest")
    assert torch.all(score[:, :1, :1] == 0)
    assert torch.all(index[:, :1, :1] == 0)  # all scores 0: tie -> smallest index
    check_patch_match(query, [key], 3, 1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_patch_match_deterministic_across_threads(dtype, stride):
    query = _features(2, 32, 21, 18, dtype=dtype, seed=8)
    keys = [_features(2, 32, 19, 23, dtype=dtype, seed=9), _features(2, 32, 8, 30, dtype=dtype, seed=10)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.srntt._patch_match_fused(query, keys, 3, stride, 1, "highest"))
    finally:
        torch.set_num_threads(threads)
    for index, score in results[1:]:
        assert torch.equal(index, results[0][0])
        assert torch.equal(score, results[0][1])


def test_patch_match_precision_is_ignored_on_cpu():
    query = _features(1, 8, 9, 9, dtype=torch.float32, seed=11)
    key = _features(1, 8, 10, 8, dtype=torch.float32, seed=12)
    out = [
        torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 0, p) for p in ("highest", "high", "medium")
    ]
    for index, score in out[1:]:
        assert torch.equal(index, out[0][0]) and torch.equal(score, out[0][1])


# ---------------------------------------------------------------------------------------------
# feature_swap


def _grid(n, p, s, pad):
    return (n + 2 * pad - p) // s + 1


def feature_swap_ref(values, index, p, s, pad, scale, out_h, out_w, reduce):
    """Loop over query cells; differentiable, any dtype (tests use float64)."""
    B, Cv = values[0].shape[:2]
    offsets, grids = [], []
    total = 0
    for v in values:
        gw = _grid(v.shape[3] // scale, p, s, pad)
        gh = _grid(v.shape[2] // scale, p, s, pad)
        offsets.append(total)
        grids.append(gw)
        total += gh * gw
    win, step, off = p * scale, s * scale, pad * scale
    padded = [F.pad(v, (win + off,) * 4) for v in values]  # reads outside are zeros
    full_h = max(out_h, (index.shape[1] - 1) * step + win) + 2 * (win + off)
    full_w = max(out_w, (index.shape[2] - 1) * step + win) + 2 * (win + off)
    out = torch.zeros(B, Cv, full_h, full_w, dtype=values[0].dtype)
    count = torch.zeros(full_h, full_w, dtype=values[0].dtype)
    base = win + off
    for b in range(B):
        for i in range(index.shape[1]):
            for j in range(index.shape[2]):
                k = int(index[b, i, j])
                r = max(t for t in range(len(offsets)) if offsets[t] <= k)
                local = k - offsets[r]
                u, v = divmod(local, grids[r])
                sy, sx = (u * s - pad) * scale + base, (v * s - pad) * scale + base
                dy, dx = i * step - off + base, j * step - off + base
                out[b, :, dy : dy + win, dx : dx + win] = (
                    out[b, :, dy : dy + win, dx : dx + win] + padded[r][b, :, sy : sy + win, sx : sx + win]
                )
                if b == 0:
                    count[dy : dy + win, dx : dx + win] += 1
    out = out[:, :, base : base + out_h, base : base + out_w]
    count = count[base : base + out_h, base : base + out_w]
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp_min(1), torch.zeros_like(out))
    return out


SWAP_CASES = [
    # B, Cv, (Gq from query map Hq, Wq), [value map sizes (key size * scale)], p, s, pad, scale, out size
    (1, 2, (6, 7), [(6, 5)], 3, 1, 0, 1, None),
    (2, 3, (6, 7), [(5, 8), (7, 4)], 3, 1, 1, 1, None),
    (1, 2, (5, 6), [(10, 12)], 3, 1, 0, 2, None),
    (1, 3, (5, 5), [(16, 12), (8, 20)], 3, 1, 1, 4, None),
    (2, 2, (9, 8), [(14, 12)], 3, 2, 1, 2, None),
    (1, 1, (7, 6), [(9, 9)], 2, 3, 0, 1, None),
    (1, 2, (6, 6), [(12, 12)], 3, 1, 0, 2, (9, 15)),
    (1, 2, (8, 7), [(7, 9)], 3, 1, 1, 1, (3, 4)),
    (1, 2, (9, 8), [(10, 10)], 3, 2, 0, 1, (14, 12)),
]


def _swap_inputs(case, dtype, seed=0):
    B, Cv, (hq, wq), vsizes, p, s, pad, scale, out_size = case
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(B, Cv, h, w, generator=g, dtype=dtype) for h, w in vsizes]
    total = sum(_grid(h // scale, p, s, pad) * _grid(w // scale, p, s, pad) for h, w in vsizes)
    gqh, gqw = _grid(hq, p, s, pad), _grid(wq, p, s, pad)
    index = torch.randint(0, total, (B, gqh, gqw), generator=g)
    if out_size is None:
        out_size = (((gqh - 1) * s + p - 2 * pad) * scale, ((gqw - 1) * s + p - 2 * pad) * scale)
    return values, index, (p, s, pad, scale), out_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("case", SWAP_CASES, ids=[str(i) for i in range(len(SWAP_CASES))])
def test_feature_swap_forward_backward(case, reduce, dtype):
    values, index, (p, s, pad, scale), (oh, ow) = _swap_inputs(case, dtype)
    out = torch.ops.srntt._feature_swap_fused(values, index, p, s, pad, scale, oh, ow, reduce)
    leaves = [v.double().requires_grad_() for v in values]
    ref = feature_swap_ref(leaves, index, p, s, pad, scale, oh, ow, reduce)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)

    grad_out = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    sizes = [n for v in values for n in v.shape[2:]]
    grads = torch.ops.srntt._feature_swap_fused_backward(grad_out, index, sizes, p, s, pad, scale, reduce)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    assert len(grads) == len(values)
    for g, rg, v in zip(grads, ref_grads, values, strict=True):
        assert g.dtype == dtype and g.shape == v.shape
        torch.testing.assert_close(g.double(), rg, atol=tol, rtol=tol)


def test_feature_swap_uncovered_pixels_are_zero():
    values, index, (p, s, pad, scale), _ = _swap_inputs(SWAP_CASES[8], torch.float64)
    out = torch.ops.srntt._feature_swap_fused(values, index, p, s, pad, scale, 14, 12, "mean")
    assert torch.all(out[:, :, 11:] == 0) and torch.all(out[:, :, :, 9:] == 0)
    assert torch.isfinite(out).all()


def test_feature_swap_backward_is_adjoint_and_deterministic():
    case = (2, 4, (11, 10), [(22, 18), (14, 26)], 3, 1, 1, 2, None)
    values, index, (p, s, pad, scale), (oh, ow) = _swap_inputs(case, torch.float64, seed=3)
    sizes = [n for v in values for n in v.shape[2:]]
    grad_out = torch.randn(2, 4, oh, ow, dtype=torch.float64)
    for reduce in ("sum", "mean"):
        out = torch.ops.srntt._feature_swap_fused(values, index, p, s, pad, scale, oh, ow, reduce)
        threads = torch.get_num_threads()
        try:
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append(
                    torch.ops.srntt._feature_swap_fused_backward(
                        grad_out, index, sizes, p, s, pad, scale, reduce
                    )
                )
        finally:
            torch.set_num_threads(threads)
        for grads in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(grads, runs[0], strict=True))
        lhs = (out * grad_out).sum()
        rhs = sum((g * v).sum() for g, v in zip(runs[0], values, strict=True))
        torch.testing.assert_close(lhs, rhs)


def test_feature_swap_rejects_bad_index():
    values, index, (p, s, pad, scale), (oh, ow) = _swap_inputs(SWAP_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.srntt._feature_swap_fused(values, index + 1000, p, s, pad, scale, oh, ow, "sum")
    with pytest.raises(RuntimeError, match="reduce"):
        torch.ops.srntt._feature_swap_fused(values, index, p, s, pad, scale, oh, ow, "max")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_patch_match_many_channels(dtype, stride):
    # C * p * p and C beyond the GEMM's K block (accumulator reloaded between blocks).
    query = _features(1, 1100, 6, 7, dtype=dtype, seed=13)
    key = _features(1, 1100, 7, 5, dtype=dtype, seed=14)
    check_patch_match(query, [key], 3, stride, 1)


def test_patch_match_non_contiguous_inputs():
    base = _features(2, 9, 14, 16, dtype=torch.float32, seed=15)
    query = base.transpose(2, 3)[:, 1::2]
    key = base[:, ::2]
    assert not query.is_contiguous() and not key.is_contiguous()
    check_patch_match(query, [key[:, :4], base[:, 1::2].flip(3)], 3, 1, 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_patch_match_chunking_does_not_change_results(batch):
    # The stride-1 path splits query rows by thread count and batch; results must not move.
    query = _features(batch, 16, 25, 13, dtype=torch.float32, seed=16)
    key = _features(batch, 16, 11, 20, dtype=torch.float32, seed=17)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            runs.append(torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 0, "highest"))
    finally:
        torch.set_num_threads(threads)
    for index, score in runs[1:]:
        assert torch.equal(index, runs[0][0]) and torch.equal(score, runs[0][1])
    check_patch_match(query, [key], 3, 1, 0)


try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:

    @settings(max_examples=30, deadline=None)
    @given(
        data=st.data(),
        p=st.integers(1, 4),
        stride=st.integers(1, 3),
        padding=st.integers(0, 2),
        C=st.integers(1, 20),
        n_keys=st.integers(1, 3),
        dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def test_patch_match_random_shapes(data, p, stride, padding, C, n_keys, dtype):
        lo = max(1, p - 2 * padding)
        size = st.integers(lo, 19)
        B = data.draw(st.integers(1, 2))
        seed = data.draw(st.integers(0, 2**16))
        query = _features(B, C, data.draw(size), data.draw(size), dtype=dtype, seed=seed)
        keys = [
            _features(B, C, data.draw(size), data.draw(size), dtype=dtype, seed=seed + 1 + i)
            for i in range(n_keys)
        ]
        check_patch_match(query, keys, p, stride, padding)

    @settings(max_examples=30, deadline=None)
    @given(
        data=st.data(),
        p=st.integers(1, 4),
        stride=st.integers(1, 3),
        padding=st.integers(0, 2),
        scale=st.integers(1, 3),
        reduce=st.sampled_from(["sum", "mean"]),
    )
    def test_feature_swap_random_shapes(data, p, stride, padding, scale, reduce):
        lo = max(1, p - 2 * padding)
        size = st.integers(lo, 9)
        n_refs = data.draw(st.integers(1, 2))
        vsizes = [(data.draw(size) * scale, data.draw(size) * scale) for _ in range(n_refs)]
        hq, wq = data.draw(size), data.draw(size)
        out_size = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(0, 20))))
        case = (data.draw(st.integers(1, 2)), 2, (hq, wq), vsizes, p, stride, padding, scale, out_size)
        values, index, _, (oh, ow) = _swap_inputs(case, torch.float64, seed=data.draw(st.integers(0, 999)))
        assume(oh >= 0 and ow >= 0)  # the default size can be negative for tiny grids
        out = torch.ops.srntt._feature_swap_fused(values, index, p, stride, padding, scale, oh, ow, reduce)
        leaves = [v.clone().requires_grad_() for v in values]
        ref = feature_swap_ref(leaves, index, p, stride, padding, scale, oh, ow, reduce)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        if ref.numel():
            grad_out = torch.randn(ref.shape, dtype=torch.float64)
            sizes = [n for v in values for n in v.shape[2:]]
            grads = torch.ops.srntt._feature_swap_fused_backward(
                grad_out, index, sizes, p, stride, padding, scale, reduce
            )
            ref_grads = torch.autograd.grad(ref, leaves, grad_out, allow_unused=True)
            for g, rg in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(
                    g, torch.zeros_like(g) if rg is None else rg, atol=1e-12, rtol=1e-12
                )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_swap_reduced_precision_rounds_once(dtype):
    values, index, (p, s, pad, scale), (oh, ow) = _swap_inputs(SWAP_CASES[3], torch.float32, seed=4)
    low = [v.to(dtype) for v in values]
    sizes = [n for v in values for n in v.shape[2:]]
    for reduce in ("sum", "mean"):
        out = torch.ops.srntt._feature_swap_fused(low, index, p, s, pad, scale, oh, ow, reduce)
        want = torch.ops.srntt._feature_swap_fused(
            [v.float() for v in low], index, p, s, pad, scale, oh, ow, reduce
        )
        assert out.dtype == dtype and torch.equal(out, want.to(dtype))
        grad_out = torch.randn(out.shape).to(dtype)
        grads = torch.ops.srntt._feature_swap_fused_backward(grad_out, index, sizes, p, s, pad, scale, reduce)
        want = torch.ops.srntt._feature_swap_fused_backward(
            grad_out.float(), index, sizes, p, s, pad, scale, reduce
        )
        assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(grads, want, strict=True))
