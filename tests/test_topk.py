"""Exact top-k matching (``patch_match(..., k=K)``), K-way blending (``feature_swap`` with weights)
and DATSR's ``topk_feature_match_index`` (docs/CONTRACT.md §2a).

The oracle is the dense float64 similarity (oracle.dense_similarity): the j-th returned key's
exact score is within oracle.TOL of the exact j-th best, and where the exact j-th best is more than oracle.TOL
from its neighbours the index is the exact one.
"""

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import features, random_index
from hypothesis import given, settings
from hypothesis import strategies as st

import srntt_core.swap as sw
from srntt_core.compat.c2matching import topk_feature_match_index
from srntt_core.ops import extension, geometry

needs_ext = pytest.mark.skipif(not extension.LOADED,
                               reason=f"srntt_core._C not loaded: {extension.LOAD_ERROR}")


def assert_topk(result, query, keys, k, patch_size=3, stride=1, padding=0, tol=oracle.TOL):
    keys = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    sim = oracle.dense_similarity(query, keys, patch_size, stride, padding)  # (B, Nq, Nk)
    b = sim.shape[0]
    index, score = result.index.cpu(), result.score.detach().cpu()
    assert index.dtype == torch.int64 and index.shape[-1] == k and score.shape == index.shape
    index, score = index.reshape(b, -1, k), score.reshape(b, -1, k).double()
    top = sim.topk(min(k + 1, sim.shape[2]), dim=2)
    chosen = sim.gather(2, index)
    # Distinct keys, the j-th as good as the exact j-th best, and the returned scores are theirs.
    assert (index.sort(dim=2).values.diff(dim=2) > 0).all()
    shortfall = (top.values[..., :k] - chosen).abs().max().item()
    assert shortfall <= tol, f"a chosen key's exact score is {shortfall:.3g} from the exact rank's"
    torch.testing.assert_close(score, chosen, atol=tol, rtol=0)
    assert (score.diff(dim=2) <= tol).all(), "scores not sorted descending"
    # Indices are exact where the exact rank is isolated.
    inf = torch.full_like(top.values[..., :1], float("inf"))
    above = torch.cat([inf, top.values], dim=2)[..., :k] - top.values[..., :k]
    below = top.values[..., :k] - torch.cat([top.values, -inf], dim=2)[..., 1 : k + 1]
    clear = (above > tol) & (below > tol)
    wrong = clear & (index != top.indices[..., :k])
    assert not wrong.any(), f"{int(wrong.sum())} of {int(clear.sum())} clear ranks differ"
    assert clear.float().mean() > 0.5


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("padding", [0, 1])
def test_topk_matches_the_dense_oracle(backend, k, padding):
    query = features(2, 8, 11, 9, seed=1, device=backend.device)
    keys = [features(2, 8, 10, 12, seed=2, device=backend.device),
            features(2, 8, 6, 7, seed=3, device=backend.device)]
    result = sw.patch_match(query, keys, padding=padding, backend=backend.name, k=k)
    assert result.index.shape == (2, 9 + 2 * padding, 7 + 2 * padding, k)
    assert_topk(result, query, keys, k, padding=padding)


def test_topk_strided_float64(backend):
    query = features(1, 5, 13, 12, seed=4, dtype=torch.float64, device=backend.device)
    key = features(1, 5, 12, 15, seed=5, dtype=torch.float64, device=backend.device)
    result = sw.patch_match(query, key, patch_size=2, stride=2, padding=1, backend=backend.name, k=4)
    assert result.score.dtype == torch.float64
    assert_topk(result, query, key, 4, patch_size=2, stride=2, padding=1, tol=1e-12)


def test_topk_on_real_features(real_features, backend):
    query = real_features["query"].to(backend.device)
    keys = [k.to(backend.device) for k in real_features["keys"]]
    result = sw.patch_match(query, keys, backend=backend.name, k=4)
    assert_topk(result, query, keys, 4)


def test_top1_is_patch_match(real_features, backend):
    query = real_features["query"].to(backend.device)
    keys = [k.to(backend.device) for k in real_features["keys"]]
    best = sw.patch_match(query, keys, padding=1, backend=backend.name)
    top1 = sw.patch_match(query, keys, padding=1, backend=backend.name, k=1)
    assert torch.equal(top1.index[..., 0], best.index)
    torch.testing.assert_close(top1.score[..., 0], best.score, atol=1e-6, rtol=0)


def test_exact_duplicates_go_to_the_smallest_index(backend):
    # The same key map twice: every key patch has an exact twin n cells later.
    query = features(1, 6, 9, 9, seed=6, device=backend.device)
    key = features(1, 6, 8, 10, seed=7, device=backend.device)
    n = 6 * 8
    result = sw.patch_match(query, [key, key], backend=backend.name, k=4)
    first, second = result.index[..., 0::2], result.index[..., 1::2]
    assert (first < n).all() and torch.equal(second, first + n)


def test_topk_gradient(backend):
    query = features(1, 3, 6, 5, seed=8, dtype=torch.float64, device=backend.device).requires_grad_()
    keys = [features(1, 3, 5, 6, seed=9, dtype=torch.float64, device=backend.device).requires_grad_(),
            features(1, 3, 4, 4, seed=10, dtype=torch.float64, device=backend.device).requires_grad_()]

    def scores(q, k0, k1):
        return sw.patch_match(q, [k0, k1], padding=1, backend=backend.name, k=3).score

    assert torch.autograd.gradcheck(scores, (query, *keys))


@needs_ext
def test_opcheck_patch_match_topk(backend):
    query = features(2, 3, 7, 6, seed=11, device=backend.device)
    keys = [features(2, 3, 6, 5, seed=12, device=backend.device)]
    torch.library.opcheck(torch.ops.srntt.patch_match_topk.default,
                          (query, keys, 3, 1, 1, 3, backend.name, "highest"))


def test_opcheck_patch_match_topk_autograd():
    query = features(1, 2, 5, 6, seed=13).requires_grad_()
    keys = [features(1, 2, 5, 5, seed=14).requires_grad_()]
    torch.library.opcheck(torch.ops.srntt.patch_match_topk.default,
                          (query, keys, 3, 1, 1, 2, "torch", "highest"))


@needs_ext
def test_opcheck_kernel_patch_match_topk_fused():
    query = features(2, 3, 7, 6, seed=15)
    keys = [features(2, 3, 6, 5, seed=16), features(2, 3, 5, 5, seed=17)]
    for args in ((query, keys, 3, 1, 0, "highest", 2), (query.double(), [k.double() for k in keys], 2, 2, 1,
                                                         "highest", 5)):
        torch.library.opcheck(torch.ops.srntt._patch_match_topk_fused.default, args)


# ---------------------------------------------------------------------------------------------
# feature_swap with K matches per query cell

def _swap_case(device="cpu", dtype=torch.float64):
    values = [features(2, 3, 16, 14, seed=20, dtype=dtype, device=device),
              features(2, 3, 10, 12, seed=21, dtype=dtype, device=device)]
    index = torch.stack([random_index(values, (5, 6), 3, 1, 1, 2, seed=s) for s in range(3)], dim=-1)
    return values, index, dict(padding=1, scale=2, out_size=(11, 13))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_blend_is_a_weighted_sum_of_swaps(backend, reduce):
    values, index, kw = _swap_case(backend.device)
    a = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64, device=backend.device)
    kw = dict(kw, reduce=reduce, backend=backend.name)
    blended = sw.feature_swap(values, index, weights=a.expand(index.shape), **kw)
    swaps = [sw.feature_swap(values, index[..., j], **kw) for j in range(3)]
    torch.testing.assert_close(blended, sum(a[j] * s for j, s in enumerate(swaps)), atol=1e-12, rtol=0)


def test_blend_weights_act_per_window():
    # One-hot weights per query cell: the swap of the index they select, window by window.
    values, index, kw = _swap_case()
    pick = torch.randint(0, 3, index.shape[:3], generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(pick, 3).double()
    blended = sw.feature_swap(values, index, weights=one_hot, **kw)
    chosen = index.gather(-1, pick[..., None])[..., 0]
    torch.testing.assert_close(blended, sw.feature_swap(values, chosen, **kw), atol=1e-12, rtol=0)


def test_blend_softmax_and_gradients():
    values, index, kw = _swap_case()
    values = [v.requires_grad_() for v in values]
    score = torch.randn(index.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    score.requires_grad_()
    out = sw.feature_swap(values, index, weights="softmax", score=score, temperature=0.5, **kw)
    want = sw.feature_swap(values, index, weights=torch.softmax(score / 0.5, dim=-1), **kw)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    small = [v[:1, :, :8, :8].detach().requires_grad_() for v in values]
    idx = random_index(small, (2, 3), 3, 1, 1, 2, batch=1, seed=3)
    idx = torch.stack([idx, idx.flip(-1)], dim=-1)
    w = torch.rand(idx.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v0, v1, w: sw.feature_swap([v0, v1], idx, weights=w, padding=1, scale=2), (*small, w))


def test_blend_of_a_topk_match_runs_end_to_end(real_features, backend):
    query = real_features["query"].to(backend.device)
    keys = [k.to(backend.device) for k in real_features["keys"]]
    match = sw.patch_match(query, keys, backend=backend.name, k=2)
    out = sw.feature_swap(real_features["relu2_1"], match.index.cpu(), scale=2, weights="softmax",
                          score=match.score.cpu(), temperature=0.01)
    assert out.shape == (1, 128, 32, 48) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, before any work

@settings(max_examples=30, deadline=None, derandomize=True)
@given(k=st.one_of(st.sampled_from([0, 65, -1, 2**63, True, False, 2.0, "2", None]), st.integers(-5, 80)))
def test_bad_k(k):
    q, key = features(1, 2, 6, 6, seed=1), features(1, 2, 5, 5, seed=2)  # 9 key patches
    if k is None or (type(k) is int and 1 <= k <= 9):
        assert sw.patch_match(q, key, k=k, backend="torch").index.dim() == (3 if k is None else 4)
        return
    with pytest.raises((ValueError, TypeError), match=r"^k: "):
        sw.patch_match(q, key, k=k, backend="torch")


@needs_ext
def test_bad_k_reaches_no_kernel():
    q, key = features(1, 2, 6, 6, seed=1), features(1, 2, 5, 5, seed=2)
    for k in (0, 65, 10):
        with pytest.raises(ValueError, match=r"\bk\b"):
            torch.ops.srntt._patch_match_topk_fused(q, [key], 3, 1, 0, "highest", k)
        with pytest.raises(ValueError, match=r"^k: "):
            torch.ops.srntt.patch_match_topk(q, [key], 3, 1, 0, k, "cpu", "highest")


@needs_ext
def test_kernel_k_bound_agrees_with_geometry():
    """csrc/srntt_limits.h's kTopKMax is geometry.TOPK_MAX: the kernel takes it and refuses one more."""
    q, key = features(1, 2, 4, 4, seed=1), features(1, 2, 11, 11, seed=2)  # 81 key patches
    top = geometry.TOPK_MAX
    assert torch.ops.srntt._patch_match_topk_fused(q, [key], 3, 1, 0, "highest", top)[0].shape[-1] == top
    with pytest.raises(ValueError, match=rf"\bk\b.*{top}"):
        torch.ops.srntt._patch_match_topk_fused(q, [key], 3, 1, 0, "highest", top + 1)


BAD_WEIGHTS = {
    "shape": (lambda w: w[..., :2], "weights"),
    "dtype": (lambda w: w.long(), "weights"),
    "nan": (lambda w: w.index_put((torch.tensor([0]),) * 4, torch.tensor([float("nan")], dtype=w.dtype)),
            "weights"),
    "inf": (lambda w: w.index_put(tuple(torch.tensor([i]) for i in (1, 2, 3, 1)),
                                  torch.tensor([float("inf")], dtype=w.dtype)), "weights"),
    "missing": (lambda w: None, "weights"),
    "not a tensor": (lambda w: w.tolist(), "weights"),
    "unknown mode": (lambda w: "mean", "weights"),
}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(case=st.sampled_from(sorted(BAD_WEIGHTS)))
def test_bad_weights(case):
    values, index, kw = _swap_case()
    make, word = BAD_WEIGHTS[case]
    with pytest.raises((ValueError, TypeError), match=rf"^{word}: "):
        sw.feature_swap(values, index, weights=make(torch.rand(index.shape, dtype=torch.float64)), **kw)


@pytest.mark.parametrize("kwargs, word", [
    (dict(weights="softmax"), "score"),
    (dict(weights="softmax", score="s"), "score"),
    (dict(weights="softmax", temperature=0.0), "temperature"),
    (dict(weights="softmax", temperature=float("nan")), "temperature"),
    (dict(weights="softmax", temperature=True), "temperature"),
    (dict(score=True), "score"),
])
def test_bad_softmax(kwargs, word):
    values, index, kw = _swap_case()
    kwargs = dict(kwargs)
    if "score" not in kwargs and word != "score":
        kwargs["score"] = torch.zeros(index.shape, dtype=torch.float64)
    if kwargs.get("score") is True:
        kwargs = dict(weights=torch.ones(index.shape, dtype=torch.float64), score=torch.zeros(index.shape))
    with pytest.raises((ValueError, TypeError), match=rf"^{word}: "):
        sw.feature_swap(values, index, **kwargs, **kw)


def test_weights_with_a_single_match_index():
    values, index, kw = _swap_case()
    with pytest.raises(ValueError, match="^weights: "):
        sw.feature_swap(values, index[..., 0], weights=torch.ones(index.shape[:3], dtype=torch.float64), **kw)


# ---------------------------------------------------------------------------------------------
# DATSR's topk_feature_match_index

def topk_original(feat_input, feat_ref, patch_size=3, input_stride=1, ref_stride=1, norm_input=False, K=2):
    """DATSR's topk_feature_match_index in plain torch: reference patches (valid grid) over their
    norm + 1e-5 correlated with the input by conv2d, torch.topk over the reference axis."""
    c = feat_ref.shape[0]
    patches = F.unfold(feat_ref[None], patch_size, stride=ref_stride)[0]  # (C p p, N_ref)
    patches = patches / (patches.norm(dim=0) + 1e-5)
    weight = patches.t().reshape(-1, c, patch_size, patch_size)
    corr = F.conv2d(feat_input[None], weight, stride=input_stride)[0]  # (N_ref, Gh, Gw)
    max_val, max_idx = torch.topk(corr, K, 0)
    if norm_input:
        norm = F.unfold(feat_input[None], patch_size, stride=input_stride)[0].norm(dim=0) + 1e-5
        max_val = max_val / norm.view(max_val.shape[1:])
    return max_idx, max_val, corr


@pytest.mark.parametrize("norm_input", [False, True])
def test_datsr_topk_feature_match_index(real_features, norm_input):
    feat_in = F.normalize(real_features["query"][0], dim=0)
    feat_ref = F.normalize(real_features["keys"][0][0], dim=0)
    idx, val = topk_feature_match_index(feat_in, feat_ref, norm_input=norm_input, K=2)
    want_idx, want_val, corr = topk_original(feat_in, feat_ref, norm_input=norm_input, K=2)
    assert idx.shape == want_idx.shape == (2, 14, 22)
    top3 = corr.topk(3, dim=0).values
    gaps = top3[:-1] - top3[1:]
    clear = (gaps[0] > 1e-4) & (gaps[1] > 1e-4)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[:, clear], want_idx[:, clear])
    torch.testing.assert_close(val[:, clear], want_val[:, clear], atol=1e-5, rtol=1e-5)
