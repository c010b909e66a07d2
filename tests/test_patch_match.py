"""srntt_core.swap.patch_match on every backend against the float64 oracle (docs/CONTRACT.md §2, §4)."""

import pytest
import torch
from conftest import features
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import EPS, TOL, assert_match, exact_match, first_copies, grid

import srntt_core.swap as sw
from srntt_core.ops import dispatch

CASES = [
    # B, C, (Hq, Wq), [(Hk, Wk), ...], patch_size, stride, padding
    pytest.param(1, 3, (7, 13), [(9, 8)], 3, 1, 0, id="odd-valid"),
    pytest.param(2, 5, (7, 13), [(9, 8)], 3, 1, 1, id="odd-same-batch2"),
    pytest.param(1, 4, (3, 17), [(11, 3)], 3, 1, 0, id="one-row-query-one-column-key"),
    pytest.param(1, 4, (1, 9), [(1, 5)], 3, 1, 1, id="one-row-maps-same-grid"),
    pytest.param(1, 6, (12, 11), [(10, 9)], 3, 2, 0, id="stride2-valid"),
    pytest.param(2, 6, (12, 11), [(10, 9)], 3, 2, 1, id="stride2-same"),
    pytest.param(1, 4, (10, 7), [(6, 6), (9, 12), (5, 3)], 3, 1, 0, id="three-refs-valid"),
    pytest.param(2, 3, (9, 9), [(7, 8), (10, 5)], 3, 1, 1, id="two-refs-same"),
    pytest.param(1, 5, (11, 9), [(8, 13), (7, 7)], 3, 2, 1, id="two-refs-stride2"),
    pytest.param(1, 7, (6, 5), [(4, 9)], 1, 1, 0, id="patch1"),
    pytest.param(1, 3, (9, 10), [(11, 7)], 5, 1, 2, id="patch5-same"),
    pytest.param(1, 2, (8, 9), [(7, 10)], 2, 1, 0, id="patch2-even"),
    pytest.param(1, 16, (37, 29), [(41, 23)], 3, 1, 0, id="larger-than-a-tile"),
    pytest.param(1, 32, (48, 45), [(50, 39), (13, 61)], 3, 1, 1, id="many-tiles-two-refs"),
    pytest.param(1, 32, (47, 44), [(50, 39)], 3, 2, 0, id="many-tiles-stride2"),
]


def _inputs(b, c, q_size, k_sizes, dtype=torch.float32, device="cpu", seed=0):
    query = features(b, c, *q_size, seed=seed, dtype=dtype, device=device)
    keys = [features(b, c, *s, seed=seed + 1 + i, dtype=dtype, device=device) for i, s in enumerate(k_sizes)]
    return query, keys


@pytest.mark.parametrize("b, c, q_size, k_sizes, patch_size, stride, padding", CASES)
def test_random_features(backend, b, c, q_size, k_sizes, patch_size, stride, padding):
    query, keys = _inputs(b, c, q_size, k_sizes, device=backend.device)
    result = sw.patch_match(query, keys, patch_size=patch_size, stride=stride, padding=padding,
                            backend=backend.name)
    assert result.score.dtype == torch.float32
    assert result.index.shape == (b, grid(q_size[0], patch_size, stride, padding),
                                  grid(q_size[1], patch_size, stride, padding))
    assert_match(result, exact_match(query, keys, patch_size, stride, padding))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_real_relu3_1_features(backend, real_features, padding, stride):
    query = real_features["query"].to(backend.device)
    keys = [k.to(backend.device) for k in real_features["keys"]]
    result = sw.patch_match(query, keys, stride=stride, padding=padding, backend=backend.name)
    exact = exact_match(query, keys, 3, stride, padding)
    assert_match(result, exact)
    # The crops share textures: the matches must be good ones, and use both references.
    assert exact.score.mean() > 0.3
    n0 = grid(keys[0].shape[-2], 3, stride, padding) * grid(keys[0].shape[-1], 3, stride, padding)
    assert (result.index < n0).any() and (result.index >= n0).any()


def test_float64_inputs_are_matched_in_float64(backend):
    query, keys = _inputs(2, 4, (9, 11), [(8, 7), (5, 6)], dtype=torch.float64, device=backend.device)
    result = sw.patch_match(query, keys, padding=1, backend=backend.name)
    assert result.score.dtype == torch.float64
    exact = exact_match(query, keys, 3, 1, 1)
    assert_match(result, exact, tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_inputs_are_matched_in_float32(backend, dtype):
    query, keys = _inputs(1, 6, (8, 10), [(9, 7)], dtype=dtype, device=backend.device)
    result = sw.patch_match(query, keys, backend=backend.name)
    assert result.score.dtype == torch.float32
    upcast = sw.patch_match(query.float(), [k.float() for k in keys], backend=backend.name)
    assert torch.equal(result.index, upcast.index)
    assert torch.equal(result.score, upcast.score)
    assert_match(result, exact_match(query, keys))


def test_mixed_float32_float64_promotes_to_float64(backend):
    query, keys = _inputs(1, 4, (7, 8), [(6, 9)], device=backend.device)
    result = sw.patch_match(query, [keys[0].double()], backend=backend.name)
    assert result.score.dtype == torch.float64
    assert_match(result, exact_match(query, keys), tol=1e-12)


def test_non_contiguous_inputs(backend):
    dev = backend.device
    base_q = features(1, 10, 13, 9, seed=3, device=dev)
    base_k = features(1, 12, 14, 11, seed=4, device=dev)
    views = {
        "transposed": (base_q.transpose(-1, -2), base_k[:, :10].transpose(-1, -2)),
        "channel-sliced": (features(1, 20, 9, 13, seed=5, device=dev)[:, ::2], base_k[:, 1:11]),
        "spatial-sliced": (base_q[:, :, 1::2, 1:], base_k[:, :10, ::2]),
        "channels-last": (base_q.contiguous(memory_format=torch.channels_last),
                          base_k[:, :10].contiguous(memory_format=torch.channels_last)),
        "expanded-batch": (base_q.expand(3, -1, -1, -1), base_k[:, :10].expand(3, -1, -1, -1)),
    }
    for n, (name, (q, k)) in enumerate(views.items()):
        padding = n % 2  # both grids, alternately
        assert not q.is_contiguous() or not k.is_contiguous(), name
        got = sw.patch_match(q, k, padding=padding, backend=backend.name)
        want = sw.patch_match(q.contiguous(), k.contiguous(), padding=padding, backend=backend.name)
        assert torch.equal(got.index, want.index), name
        assert torch.equal(got.score, want.score), name
        assert_match(got, exact_match(q, [k], 3, 1, padding))


@pytest.mark.parametrize("padding", [0, 1])
def test_several_references_index_offsets(backend, padding):
    """Indices count over the key grids concatenated in list order; a query cut out of the
    third reference finds itself there, at that reference's offset."""
    dev = backend.device
    shapes = [(7, 9), (12, 5), (10, 11)]
    keys = [features(1, 8, h, w, seed=10 + i, device=dev) for i, (h, w) in enumerate(shapes)]
    query = keys[2][:, :, 2:9, 1:10]
    result = sw.patch_match(query, keys, padding=padding, backend=backend.name)
    assert_match(result, exact_match(query, keys, 3, 1, padding))
    sizes = [(grid(k.shape[-2], 3, 1, padding), grid(k.shape[-1], 3, 1, padding)) for k in keys]
    offset = sizes[0][0] * sizes[0][1] + sizes[1][0] * sizes[1][1]
    # Interior query cells (no padding in their window) are exact copies of key 2's cells.
    for i in range(padding, result.index.shape[1] - padding):
        for j in range(padding, result.index.shape[2] - padding):
            u, v = i + 2, j + 1
            assert result.index[0, i, j].item() == offset + u * sizes[2][1] + v
            assert result.score[0, i, j].item() == pytest.approx(1.0, abs=1e-6)
    # Each reference alone gives the same answer shifted by its offset where it wins.
    alone = sw.patch_match(query, keys[2], padding=padding, backend=backend.name)
    won = result.index >= offset
    assert torch.equal(result.index[won], alone.index[won] + offset)


def test_list_of_one_equals_a_tensor(backend):
    query, keys = _inputs(2, 5, (8, 9), [(7, 10)], device=backend.device)
    a = sw.patch_match(query, keys[0], backend=backend.name)
    b = sw.patch_match(query, keys, backend=backend.name)
    c = sw.patch_match(query, tuple(keys), backend=backend.name)
    assert torch.equal(a.index, b.index) and torch.equal(a.index, c.index)
    assert torch.equal(a.score, b.score) and torch.equal(a.score, c.score)


def test_batch_elements_are_independent(backend):
    query, keys = _inputs(3, 6, (9, 8), [(7, 11), (6, 6)], device=backend.device)
    result = sw.patch_match(query, keys, backend=backend.name)
    for i in range(3):
        one = sw.patch_match(query[i : i + 1], [k[i : i + 1] for k in keys], backend=backend.name)
        assert torch.equal(result.index[i], one.index[0])
        torch.testing.assert_close(result.score[i], one.score[0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# zero patches and ties

@pytest.mark.parametrize("padding", [0, 1])
def test_zero_query_patches_score_zero_index_zero(backend, padding):
    dev = backend.device
    query = features(1, 4, 10, 12, seed=1, device=dev)
    query[:, :, 2:8, 3:10] = 0
    keys = [features(1, 4, 9, 8, seed=2, device=dev), features(1, 4, 6, 7, seed=3, device=dev)]
    result = sw.patch_match(query, keys, padding=padding, backend=backend.name)
    # query cells whose window lies inside the zero block (grid coordinates)
    zero = (slice(2 + padding, 8 + padding - 2), slice(3 + padding, 10 + padding - 2))
    assert (result.score[0][zero] == 0).all()
    assert (result.index[0][zero] == 0).all()
    assert_match(result, exact_match(query, keys, 3, 1, padding))


def test_all_zero_key_scores_zero_everywhere(backend):
    dev = backend.device
    query = features(2, 5, 7, 9, seed=1, device=dev)
    key = torch.zeros(2, 5, 8, 6, device=dev)
    result = sw.patch_match(query, key, backend=backend.name)
    assert (result.score == 0).all()
    assert (result.index == 0).all()


def test_zero_key_patches_beat_negative_scores_smallest_first(backend):
    """Every non-zero key patch scores < 0 against the query; the zero key patches score exactly 0,
    so the answer is the smallest zero patch's index — in the second reference."""
    dev = backend.device
    key0 = features(1, 3, 6, 6, seed=7, device=dev).abs() + 0.1
    key1 = features(1, 3, 9, 10, seed=8, device=dev).abs() + 0.1
    key1[:, :, 3:9, 4:9] = 0  # zero cells (valid grid): rows 3..6, cols 4..6
    query = -(features(1, 3, 7, 8, seed=9, device=dev).abs() + 0.1)
    result = sw.patch_match(query, [key0, key1], backend=backend.name)
    smallest_zero = 4 * 4 + (3 * 8 + 4)
    assert (result.index == smallest_zero).all()
    assert (result.score == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_duplicate_key_patches_smallest_index_wins(backend, dtype, stride, padding):
    """The key is a random block tiled 3x4 times, and the same map is given again as a second
    reference: every key patch has exact duplicates at larger indices, which must never win.

    NB: duplicates tie exactly only if they are scored identically; a GEMM whose rounding depends on
    a column's position in its tile can put one a ulp above an earlier copy, so this needs care.
    Flat image regions give such duplicates in real relu3_1 maps."""
    dev = backend.device
    g = torch.Generator().manual_seed(5)
    block = torch.rand((1, 16, 6, 6), generator=g, dtype=dtype)
    key = block.repeat(1, 1, 3, 4).to(dev)
    query = torch.rand((1, 16, 20, 23), generator=g, dtype=dtype)
    query[:, :, :6, :6] = block  # query patches equal to key patches: ties at score 1
    query = query.to(dev)
    result = sw.patch_match(query, [key, key], stride=stride, padding=padding, backend=backend.name)
    assert_match(result, exact_match(query, [key, key], 3, stride, padding))
    first_copy = first_copies([key, key], 3, stride, padding)[0]
    index = result.index.cpu()
    later = first_copy[index] != index
    assert not later.any(), (
        f"{int(later.sum())} of {index.numel()} cells chose a later duplicate, e.g. "
        f"{index[later][:4].tolist()} instead of {first_copy[index][later][:4].tolist()}")


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_float32_tie_that_float64_breaks_goes_to_the_true_maximum(name, stride, k):
    """Key patch 0 and key patch 2 (stride 2) / 4 (stride 1) have the same dot product with the
    query, bit for bit (they differ only in a channel where the query is 0), and key patch 0 is a
    little longer: in float64 the later patch is the better one, by 7e-9, but in float32 the two
    reciprocal norms, hence the two values, are equal. Only the near-tie re-scoring finds it; a
    search that trusts float32 answers the smaller index. The patches between them cross a row of
    negative values and score far lower."""
    reasons = dispatch.get(name).not_supported_reasons(torch.device("cpu"))
    if reasons:
        pytest.skip(f"backend {name!r}: {'; '.join(reasons)}")
    query = torch.zeros(1, 4, 3, 3)
    query[:, :3] = 1
    key = torch.ones(1, 4, 7, 3)
    key[:, 3] = 0
    key[:, 3, :3] = 2e-4
    key[:, :3, 3] = -1
    norms = key.double().square().sum(1).unfold(1, 3, stride).sum((2, 3)).sqrt()[0]
    first, last = (1 / norms[[0, -1]]).float()
    assert first == last and norms[0] > norms[-1]  # the construction holds
    exact = exact_match(query, key, 3, stride, 0)
    true_best = norms.numel() - 1
    assert exact.index.item() == true_best and exact.margin.item() > 1e-9
    result = sw.patch_match(query, key, stride=stride, backend=name, k=k)
    if k is None:
        assert result.index.item() == true_best
        assert_match(result, exact)
    else:
        assert result.index.reshape(-1).tolist() == [true_best, 0]


def test_identical_query_patches_get_identical_answers(backend):
    dev = backend.device
    patch = features(1, 8, 3, 3, seed=4, device=dev)
    query = patch.repeat(1, 1, 4, 5)  # every 3rd cell is the same patch
    key = features(1, 8, 10, 12, seed=5, device=dev)
    result = sw.patch_match(query, key, backend=backend.name)
    same = result.index[0, ::3, ::3]
    assert (same == same[0, 0]).all()
    assert (result.score[0, ::3, ::3] == result.score[0, 0, 0]).all()


# ---------------------------------------------------------------------------------------------
# precision contract and determinism

@pytest.mark.parametrize("precision, tol", [("highest", 1e-5), ("high", 1e-3), ("medium", 2e-3)])
def test_precision_contract(backend, real_features, precision, tol):
    query = real_features["query"].to(backend.device)
    keys = [k.to(backend.device) for k in real_features["keys"]]
    result = sw.patch_match(query, keys, padding=1, backend=backend.name, precision=precision)
    assert_match(result, exact_match(query, keys, 3, 1, 1), tol=tol)


def test_repeated_calls_are_bitwise_equal(backend):
    query, keys = _inputs(2, 16, (23, 19), [(21, 17), (9, 30)], device=backend.device)
    a = sw.patch_match(query, keys, padding=1, backend=backend.name)
    b = sw.patch_match(query, keys, padding=1, backend=backend.name)
    assert torch.equal(a.index, b.index) and torch.equal(a.score, b.score)
    if backend.device == "cpu":  # whatever the number of threads
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c = sw.patch_match(query, keys, padding=1, backend=backend.name)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(a.index, c.index) and torch.equal(a.score, c.score)


def test_all_backends_agree(real_features):
    from conftest import cpu_backends_available

    names = cpu_backends_available()
    if len(names) < 2:
        pytest.skip(f"only {names} can run on the CPU")
    query, keys = real_features["query"], real_features["keys"]
    exact = exact_match(query, keys)
    results = {n: sw.patch_match(query, keys, backend=n) for n in names}
    sure = exact.margin > TOL
    for n, r in results.items():
        assert torch.equal(r.index[sure], exact.index[sure]), n
        torch.testing.assert_close(r.score, results[names[0]].score, atol=2 * TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# gradients of score (float64)

@pytest.mark.parametrize("padding", [0, 1])
def test_score_gradcheck(backend, padding):
    dev = backend.device
    query = features(1, 2, 5, 6, seed=11, dtype=torch.float64, device=dev).requires_grad_()
    keys = [features(1, 2, 5, 5, seed=12, dtype=torch.float64, device=dev).requires_grad_(),
            features(1, 2, 4, 6, seed=13, dtype=torch.float64, device=dev).requires_grad_()]
    exact = exact_match(query, keys, 3, 1, padding)
    # gradcheck perturbs inputs by 1e-6: the argmax must not flip, so the maxima must be clear.
    assert exact.margin.min().item() > 1e-4

    def score(q, k0, k1):
        return sw.patch_match(q, [k0, k1], padding=padding, backend=backend.name).score

    assert torch.autograd.gradcheck(score, (query, *keys), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1)])
def test_score_gradient_equals_direct_cosine(backend, stride, padding):
    """Backward through the selected pair equals autograd of a direct float64 cosine at the chosen
    pairs; a zero query patch scores 0 whatever the key, so no gradient flows through its pair."""
    dev = backend.device
    q0 = features(2, 3, 9, 8, seed=21, dtype=torch.float64, device=dev)
    q0[:, :, :4, :4] = 0
    k0 = [features(2, 3, 7, 9, seed=22, dtype=torch.float64, device=dev),
          features(2, 3, 6, 5, seed=23, dtype=torch.float64, device=dev)]
    query, keys = q0.clone().requires_grad_(), [k.clone().requires_grad_() for k in k0]
    result = sw.patch_match(query, keys, stride=stride, padding=padding, backend=backend.name)
    weights = torch.randn(result.score.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64).to(dev)
    (result.score * weights).sum().backward()

    q_ref, k_ref = q0.clone().requires_grad_(), [k.clone().requires_grad_() for k in k0]
    unfold = torch.nn.functional.unfold
    qd = unfold(q_ref, 3, padding=padding, stride=stride)
    kd = torch.cat([unfold(k, 3, padding=padding, stride=stride) for k in k_ref], dim=2)
    idx = result.index.reshape(2, 1, -1).expand(-1, qd.shape[1], -1)
    kc = kd.gather(2, idx)
    nq, nk = qd.norm(dim=1), kc.norm(dim=1)
    cos = (qd * kc).sum(1) / (nq.clamp_min(EPS) * nk.clamp_min(EPS))
    cos = torch.where((nq > EPS) & (nk > EPS), cos, cos.detach())
    (cos.view_as(weights) * weights).sum().backward()
    torch.testing.assert_close(query.grad, q_ref.grad, atol=1e-10, rtol=1e-8)
    for k, kr in zip(keys, k_ref, strict=True):
        torch.testing.assert_close(k.grad, kr.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_zero_query_patch_gradient_is_zero_and_finite(backend, dtype):
    """An all-zero query patch scores 0 against every key; its gradient is 0 (the literal
    derivative of the eps-clamped cosine there is k / (eps |k|), ~1e12: inf in float16), and the
    gradient of the whole query stays bounded by that of its non-zero patches."""
    dev = backend.device
    q0 = features(1, 3, 8, 8, seed=31, dtype=torch.float64).clamp_min(0.1)
    q0[:, :, 2:5, 2:5] = 0  # one all-zero 3x3 patch, cell (2, 2) of the valid grid
    query = q0.to(dtype).to(dev).requires_grad_()
    key = features(1, 3, 7, 6, seed=32, device=dev)
    result = sw.patch_match(query, key, backend=backend.name)
    assert result.score[0, 2, 2].item() == 0
    grad_zero_patch, = torch.autograd.grad(result.score[0, 2, 2], query, retain_graph=True)
    assert torch.count_nonzero(grad_zero_patch) == 0
    grad, = torch.autograd.grad(result.score.sum(), query)
    assert torch.isfinite(grad).all()
    # |d cos / dq| <= 2 / |q| per patch; the smallest non-zero patch here has |q| > 0.1.
    assert grad.abs().max().item() < 2 / 0.1 * 9


def test_index_is_not_differentiable(backend):
    query = features(1, 3, 6, 6, seed=1, device=backend.device).requires_grad_()
    result = sw.patch_match(query, features(1, 3, 6, 6, seed=2, device=backend.device), backend=backend.name)
    assert result.score.requires_grad
    assert not result.index.requires_grad


# ---------------------------------------------------------------------------------------------
# hypothesis

@st.composite
def problems(draw):
    patch_size = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, (patch_size + 1) // 2))
    lo = max(1, patch_size - 2 * padding)  # the smallest map with a 1x1 grid

    def size():
        return draw(st.integers(lo, lo + 9)), draw(st.integers(lo, lo + 9))

    b = draw(st.integers(1, 2))
    c = draw(st.integers(1, 9))
    k_sizes = [size() for _ in range(draw(st.integers(1, 3)))]
    return b, c, size(), k_sizes, patch_size, stride, padding, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_hypothesis_shapes(backend, problem):
    b, c, q_size, k_sizes, patch_size, stride, padding, seed = problem
    query, keys = _inputs(b, c, q_size, k_sizes, device=backend.device, seed=seed)
    result = sw.patch_match(query, keys, patch_size=patch_size, stride=stride, padding=padding,
                            backend=backend.name)
    assert_match(result, exact_match(query, keys, patch_size, stride, padding))
