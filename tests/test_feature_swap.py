"""srntt_core.swap.feature_swap on every backend against the float64 oracle and a literal
loop-over-cells transcription of docs/CONTRACT.md §3; gradients and determinism of the backward."""

import pytest
import torch
from conftest import features, grid, naive_feature_swap, random_index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srntt_core.swap as sw
from srntt_core.ops import torch_backend

CASES = [
    # B, Cv, query grid (Gq_h, Gq_w), key map sizes [(Hk, Wk)...], patch_size, stride, padding, scale
    pytest.param(1, 3, (5, 11), [(7, 9)], 3, 1, 0, 1, id="valid-s1"),
    pytest.param(2, 2, (7, 6), [(5, 8)], 3, 1, 1, 1, id="same-s1-batch2"),
    pytest.param(1, 2, (4, 5), [(6, 7)], 3, 1, 0, 2, id="valid-s2"),
    pytest.param(1, 2, (3, 4), [(5, 4)], 3, 1, 1, 4, id="same-s4"),
    pytest.param(1, 3, (4, 3), [(9, 8)], 3, 2, 0, 1, id="stride2-valid"),
    pytest.param(2, 2, (3, 4), [(7, 6)], 3, 2, 1, 2, id="stride2-same-s2"),
    pytest.param(1, 2, (4, 4), [(5, 6), (8, 3), (4, 4)], 3, 1, 0, 2, id="three-refs"),
    pytest.param(1, 2, (1, 7), [(3, 5), (6, 6)], 3, 1, 1, 1, id="one-row-two-refs"),
    pytest.param(1, 3, (4, 5), [(6, 5)], 1, 1, 0, 2, id="patch1"),
    pytest.param(1, 2, (3, 5), [(7, 6)], 5, 2, 2, 1, id="patch5-stride2"),
]


def _values(b, cv, k_sizes, scale, dtype=torch.float32, device="cpu", seed=0):
    return [features(b, cv, h * scale, w * scale, seed=seed + i, dtype=dtype, device=device)
            for i, (h, w) in enumerate(k_sizes)]


def _oracle(values, index, **kw):
    """The float64 ``torch`` reference (the oracle)."""
    return sw.feature_swap([v.double() for v in values], index, backend="torch", **kw)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("b, cv, q_grid, k_sizes, patch_size, stride, padding, scale", CASES)
def test_against_oracle_and_literal_spec(backend, b, cv, q_grid, k_sizes, patch_size, stride, padding,
                                         scale, reduce):
    values = _values(b, cv, k_sizes, scale, device=backend.device)
    index = random_index(values, q_grid, patch_size, stride, padding, scale)
    kw = dict(patch_size=patch_size, stride=stride, padding=padding, scale=scale, reduce=reduce)
    out = sw.feature_swap(values, index, backend=backend.name, **kw)
    assert out.dtype == torch.float32
    want_h = ((q_grid[0] - 1) * stride + patch_size - 2 * padding) * scale
    want_w = ((q_grid[1] - 1) * stride + patch_size - 2 * padding) * scale
    assert out.shape == (b, cv, want_h, want_w)
    oracle = _oracle(values, index, **kw)
    literal = naive_feature_swap(values, index, **kw)
    torch.testing.assert_close(oracle.cpu(), literal, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.double().cpu(), literal, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("out_size", [(9, 14), (3, 4), (12, 5)], ids=["larger", "smaller", "mixed"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_out_size_override(backend, out_size, reduce):
    values = _values(1, 2, [(6, 7)], 1, device=backend.device)
    index = random_index(values, (5, 8), padding=1)
    kw = dict(padding=1, out_size=out_size, reduce=reduce)
    out = sw.feature_swap(values, index, backend=backend.name, **kw)
    assert out.shape[-2:] == out_size
    torch.testing.assert_close(out.double().cpu(), naive_feature_swap(values, index, **kw), atol=1e-5, rtol=0)
    if out_size == (9, 14):  # pixels no window covers are zero
        # Query windows cover rows/cols up to (G - 1) + patch_size - padding.
        assert (out[..., 7:, :] == 0).all() and (out[..., :, 10:] == 0).all()


def test_float64_values(backend):
    values = _values(2, 3, [(6, 5), (4, 7)], 2, dtype=torch.float64, device=backend.device)
    index = random_index(values, (4, 6), padding=1, scale=2)
    for reduce in ("mean", "sum"):
        kw = dict(padding=1, scale=2, reduce=reduce)
        out = sw.feature_swap(values, index, backend=backend.name, **kw)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.cpu(), naive_feature_swap(values, index, **kw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_values_are_accepted(backend, dtype):
    """Output dtype = values dtype; it agrees with the float32 swap to within ``dtype``'s rounding of
    a sum of up to patch_size^2 values."""
    values = _values(1, 4, [(6, 7)], 2, device=backend.device)
    index = random_index(values, (5, 4), scale=2)
    low = [v.to(dtype) for v in values]
    out = sw.feature_swap(low, index, scale=2, backend=backend.name)
    assert out.dtype == dtype
    want = sw.feature_swap([v.float() for v in low], index, scale=2, backend=backend.name)
    eps = torch.finfo(dtype).eps
    bound = 9 * eps * max(v.abs().max().item() for v in values)
    torch.testing.assert_close(out.float(), want, atol=bound, rtol=eps)


def test_non_contiguous_values_and_index(backend):
    dev = backend.device
    base = features(2, 6, 14, 16, seed=3, device=dev)
    values = [base.transpose(-1, -2)[:, ::2], base[:, 1:4, 2:, 1:]]
    assert not any(v.is_contiguous() for v in values)
    index_t = random_index([v.contiguous() for v in values], (6, 5), scale=2, seed=9).transpose(-1, -2)
    assert not index_t.is_contiguous()
    for index in (index_t, index_t.to(torch.int32)):
        out = sw.feature_swap(values, index, scale=2, backend=backend.name)
        want = sw.feature_swap([v.contiguous() for v in values], index_t.contiguous(), scale=2,
                               backend=backend.name)
        assert torch.equal(out, want)
        torch.testing.assert_close(out.double().cpu(), naive_feature_swap(values, index_t, scale=2),
                                   atol=1e-5, rtol=0)


def test_reads_outside_values_are_zero(backend):
    """Same grid (padding 1), constant values, every cell copying key cell (0, 0), whose window spans
    value rows/cols -1..1: only its lower-right 2x2 reads are in range. Worked out by hand, the sum
    at output pixel (y, x) is the number of windows i in {y-1, y} times windows j in {x-1, x}."""
    dev = backend.device
    values = torch.ones(1, 1, 5, 6, device=dev)
    index = torch.zeros(1, 5, 6, dtype=torch.int64, device=dev)
    out = sw.feature_swap(values, index, padding=1, reduce="sum", backend=backend.name)
    rows = torch.tensor([1.0, 2, 2, 2, 2])
    cols = torch.tensor([1.0, 2, 2, 2, 2, 2])
    torch.testing.assert_close(out[0, 0].cpu(), rows[:, None] * cols[None, :], atol=0, rtol=0)
    # mean: each pixel is covered by min(3, ...) windows; divided by that count
    mean = sw.feature_swap(values, index, padding=1, reduce="mean", backend=backend.name)
    count = (torch.tensor([2.0, 3, 3, 3, 2])[:, None] * torch.tensor([2.0, 3, 3, 3, 3, 2])[None, :])
    torch.testing.assert_close(mean[0, 0].cpu(), rows[:, None] * cols[None, :] / count, atol=1e-7, rtol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_self_match_reconstructs_the_map(backend, padding):
    """Swapping a map into its own layout along its own self-match returns it (mean reduce)."""
    key = features(1, 8, 9, 13, seed=4, device=backend.device)
    match = sw.patch_match(key, key, padding=padding, backend=backend.name)
    n_w = grid(13, 3, 1, padding)
    ii, jj = torch.meshgrid(torch.arange(match.index.shape[1]), torch.arange(n_w), indexing="ij")
    assert torch.equal(match.index[0].cpu(), ii * n_w + jj)
    out = sw.feature_swap(key, match.index, padding=padding, backend=backend.name)
    torch.testing.assert_close(out, key, atol=1e-6, rtol=0)


def test_real_features_all_levels(backend, real_features):
    """The SRNTT swap: relu3_1 match, values at relu3_1 (x1), relu2_1 (x2), relu1_1 (x4)."""
    dev = backend.device
    query = real_features["query"].to(dev)
    keys = [k.to(dev) for k in real_features["keys"]]
    index = sw.patch_match(query, keys, backend=backend.name).index
    for layer, scale in (("relu3_1", 1), ("relu2_1", 2), ("relu1_1", 4)):
        values = keys if layer == "relu3_1" else [v.to(dev) for v in real_features[layer]]
        out_size = (query.shape[-2] * scale, query.shape[-1] * scale)
        out = sw.feature_swap(values, index, scale=scale, out_size=out_size, backend=backend.name)
        assert out.shape == (1, values[0].shape[1], *out_size)
        oracle = _oracle(values, index, scale=scale, out_size=out_size)
        torch.testing.assert_close(out.double().cpu(), oracle.cpu(), atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_gradcheck_values(backend, reduce, scale):
    dev = backend.device
    values = [features(1, 2, 4 * scale, 3 * scale, seed=1, dtype=torch.float64, device=dev).requires_grad_(),
              features(1, 2, 3 * scale, 5 * scale, seed=2, dtype=torch.float64, device=dev).requires_grad_()]
    index = random_index(values, (3, 4), padding=1, scale=scale, seed=scale)

    def swap(v0, v1):
        return sw.feature_swap([v0, v1], index, padding=1, scale=scale, reduce=reduce, backend=backend.name)

    assert torch.autograd.gradcheck(swap, tuple(values), fast_mode=True)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradcheck_values_stride2_valid(backend, reduce):
    dev = backend.device
    values = features(2, 2, 10, 8, seed=3, dtype=torch.float64, device=dev).requires_grad_()
    index = random_index(values, (3, 2), stride=2, scale=2, seed=4)

    def swap(v):
        return sw.feature_swap(v, index, stride=2, scale=2, reduce=reduce, backend=backend.name)

    assert torch.autograd.gradcheck(swap, (values,), fast_mode=True)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradgradcheck(backend, reduce):
    """The swap is linear: its backward is linear in grad_out, and the double backward (with
    respect to grad_out) is the swap again; gradgradcheck checks both in float64."""
    dev = backend.device
    values = [features(1, 2, 6, 4, seed=1, dtype=torch.float64, device=dev).requires_grad_(),
              features(1, 2, 4, 6, seed=2, dtype=torch.float64, device=dev).requires_grad_()]
    index = random_index(values, (3, 4), padding=1, scale=2, seed=3)

    def swap(v0, v1):
        return sw.feature_swap([v0, v1], index, padding=1, scale=2, reduce=reduce, backend=backend.name)

    assert torch.autograd.gradgradcheck(swap, tuple(values))


def test_double_backward_is_the_swap(backend):
    """d/d(grad_out) <backward(grad_out), w> = swap(w), exactly (no warning, no None)."""
    dev = backend.device
    values = features(1, 3, 10, 12, seed=4, dtype=torch.float64, device=dev).requires_grad_()
    index = random_index(values, (5, 6), padding=1, scale=2, seed=5)
    out = sw.feature_swap(values, index, padding=1, scale=2, backend=backend.name)
    grad_out = torch.zeros_like(out).requires_grad_()
    grad_values, = torch.autograd.grad(out, values, grad_out, create_graph=True)
    w = features(*values.shape, seed=6, dtype=torch.float64, device=dev)
    second, = torch.autograd.grad((grad_values * w).sum(), grad_out)
    expected = sw.feature_swap(w, index, padding=1, scale=2, backend="torch")
    torch.testing.assert_close(second, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_is_the_adjoint(backend, reduce):
    """<swap(v), g> = <v, swap^T(g)> in float64, on a larger case than gradcheck can afford."""
    dev = backend.device
    values = [features(2, 5, 14, 18, seed=5, dtype=torch.float64, device=dev).requires_grad_(),
              features(2, 5, 10, 6, seed=6, dtype=torch.float64, device=dev).requires_grad_()]
    index = random_index(values, (9, 11), padding=1, scale=2, seed=7)
    out = sw.feature_swap(values, index, padding=1, scale=2, reduce=reduce, backend=backend.name)
    g = features(*out.shape, seed=8, dtype=torch.float64, device=dev)
    grads = torch.autograd.grad(out, values, g)
    lhs = (out * g).sum()
    rhs = sum((v * gv).sum() for v, gv in zip(values, grads, strict=True))
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-12)
    oracle = torch_backend.feature_swap_backward(g.cpu(), index.cpu(), [14, 18, 10, 6], 3, 1, 1, 2, reduce)
    for gv, go in zip(grads, oracle, strict=True):
        torch.testing.assert_close(gv.cpu(), go, atol=1e-12, rtol=0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_backward_is_deterministic(backend, reduce):
    """Twice the same backward, bitwise; many windows read the same value pixels (index collisions)
    in float32, where any order-dependent accumulation would show."""
    dev = backend.device
    values = [features(2, 16, 24, 20, seed=9, device=dev).requires_grad_(),
              features(2, 16, 12, 16, seed=10, device=dev).requires_grad_()]
    index = random_index(values, (21, 19), padding=1, scale=2, seed=11) % 7  # heavy collisions
    out = sw.feature_swap(values, index, padding=1, scale=2, reduce=reduce, backend=backend.name)
    g = features(*out.shape, seed=12, device=dev)
    first = torch.autograd.grad(out, values, g, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, values, g, retain_graph=True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
    if dev == "cpu":  # and whatever the number of threads
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = torch.autograd.grad(out, values, g, retain_graph=True)
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(first, single, strict=True):
            assert torch.equal(a, b)
    ref = torch_backend.feature_swap_backward(g.double().cpu(), index.cpu(), [24, 20, 12, 16], 3, 1, 1, 2,
                                              reduce)
    for a, r in zip(first, ref, strict=True):
        torch.testing.assert_close(a.double().cpu(), r, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# hypothesis

@st.composite
def swap_problems(draw):
    patch_size = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, (patch_size + 1) // 2))
    scale = draw(st.sampled_from([1, 2, 3, 4]))
    lo = max(1, patch_size - 2 * padding)
    k_sizes = [(draw(st.integers(lo, lo + 5)), draw(st.integers(lo, lo + 5)))
               for _ in range(draw(st.integers(1, 3)))]
    q_grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    # values sizes need not be multiples of scale
    extra = (draw(st.integers(0, scale - 1)), draw(st.integers(0, scale - 1)))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 4)), q_grid, k_sizes, patch_size, stride,
            padding, scale, extra, draw(st.sampled_from(["mean", "sum"])), draw(st.integers(0, 2**16)),
            draw(st.none() | st.tuples(st.integers(1, 20), st.integers(1, 20))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=swap_problems())
def test_hypothesis_shapes(backend, problem):
    b, cv, q_grid, k_sizes, patch_size, stride, padding, scale, extra, reduce, seed, out_size = problem
    values = [features(b, cv, h * scale + extra[0], w * scale + extra[1], seed=seed + i,
                       device=backend.device) for i, (h, w) in enumerate(k_sizes)]
    index = random_index(values, q_grid, patch_size, stride, padding, scale, seed=seed)
    kw = dict(patch_size=patch_size, stride=stride, padding=padding, scale=scale, reduce=reduce,
              out_size=out_size)
    default = min((g - 1) * stride + patch_size - 2 * padding for g in q_grid) * scale
    if default < 1 and out_size is None:
        with pytest.raises(ValueError, match="out_size"):
            sw.feature_swap(values, index, backend=backend.name, **kw)
        kw["out_size"] = (q_grid[0] * stride * scale, q_grid[1] * stride * scale)
    out = sw.feature_swap(values, index, backend=backend.name, **kw)
    torch.testing.assert_close(out.double().cpu(), _oracle(values, index, **kw).cpu(), atol=1e-5, rtol=1e-6)
