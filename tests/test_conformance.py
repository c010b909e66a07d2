"""Kernel conformance: every registered backend (tests/conftest.py ``REGISTRY``) against the float64
oracle (tests/oracle.py), called at the kernel level through its ``srntt_core.ops.dispatch.Backend``
object (torchvision's ``RoIOpTester`` pattern: one suite, the backends as a parameter).

patch_match: dtypes, every precision, paddings/strides, patch sizes, several keys, ties, zero
patches, non-contiguous inputs; feature_swap: forward and backward, mean/sum, scales, output size
overrides, float16/bfloat16, the correctly rounded mean, determinism, the adjoint; gradients
(gradcheck in float64) and bad input through the public ops; the kernel-level schemas of every
backend agree. The Triton interpreter (no GPU) runs the cases marked ``tiny`` only.
Backend-specific tests (threads, streams, autotuning, build checks) stay in their own files.
"""

import inspect
from dataclasses import dataclass

import oracle
import pytest
import torch
from conftest import backend_cases, features, random_index, skip_unless_runs
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from srntt_core import _triton  # noqa: F401  (registers the srntt::_*_triton ops it has)
from srntt_core.ops import dispatch, extension, torch_backend

KERNELS = [p.values[0] for p in backend_cases(interpreted=True, every_device=True)]


class Kernel:
    """A registered backend, called at the kernel level with inputs moved to its device."""

    def __init__(self, case):
        self.case = skip_unless_runs(case)
        self.impl = dispatch.get(case.name)
        self.device = torch.device(case.device)

    def _to(self, x):
        return [t.to(self.device) for t in x] if isinstance(x, (list, tuple)) else x.to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def patch_match(self, query, keys, patch_size, stride, padding, precision="highest"):
        out = self.impl.patch_match(self._to(query), self._to(keys), patch_size, stride, padding, precision)
        self._sync()
        return out

    def feature_swap(self, values, index, patch_size, stride, padding, scale, out_h, out_w, reduce):
        out = self.impl.feature_swap(self._to(values), self._to(index), patch_size, stride, padding, scale,
                                     out_h, out_w, reduce)
        self._sync()
        return out

    def feature_swap_backward(self, grad_out, index, value_sizes, patch_size, stride, padding, scale, reduce):
        out = self.impl.feature_swap_backward(self._to(grad_out).contiguous(), self._to(index), value_sizes,
                                              patch_size, stride, padding, scale, reduce)
        self._sync()
        return out


def _id(x) -> str:
    if isinstance(x, tuple):
        return "-".join(_id(y) for y in x)
    if isinstance(x, torch.dtype):
        return {torch.float32: "f32", torch.float64: "f64"}[x]
    return getattr(x, "id", str(x))


def each(cases=(None,), tiny=False, when=lambda kernel: True):
    """pytest params (kernel, case): every registered backend ``when`` accepts with every case; the
    Triton interpreter (slow) with the cases ``tiny`` accepts only (all with ``tiny=True``)."""
    out = []
    for k in KERNELS:
        marks = [getattr(pytest.mark, k.mark)] if k.mark else []
        for c in cases:
            if not when(k) or (k.interpreted and not (tiny is True or (tiny and tiny(c)))):
                continue
            name = str(k) if c is None else f"{k}-{_id(c)}"
            out.append(pytest.param(k, c, id=name, marks=marks))
    return out


@dataclass(frozen=True)
class Case:
    id: str
    b: int
    c: int
    query: tuple
    keys: tuple
    patch_size: int = 3
    stride: int = 1
    padding: int = 0
    tiny: bool = False


def _is_tiny(case_dtype) -> bool:
    """The interpreter's cases: the tiny ones in float32, one of them in float64 too."""
    case, dtype = case_dtype
    return case.tiny and (dtype == torch.float32 or case.id in ("stride2-same", "stride2-same-x2-odd"))


# ---------------------------------------------------------------------------------------------
# patch_match

MATCH_CASES = [
    Case("valid", 1, 3, (7, 9), ((8, 6),)),
    Case("same-batch2", 2, 5, (11, 13), ((9, 10),), 3, 1, 1),
    Case("three-keys", 1, 4, (10, 7), ((6, 6), (9, 12), (5, 3))),
    Case("two-keys-same", 2, 3, (9, 9), ((7, 8), (10, 5)), 3, 1, 1),
    Case("stride2", 1, 6, (13, 11), ((12, 9),), 3, 2, 0),
    Case("patch2-stride3", 1, 2, (8, 10), ((7, 9),), 2, 3, 1),
    Case("patch1", 2, 3, (6, 7), ((9, 5),), 1, 1, 0),
    Case("patch5-same", 1, 3, (12, 9), ((10, 11),), 5, 1, 2),
    Case("larger-than-a-tile", 1, 8, (23, 37), ((31, 19), (17, 40))),
    Case("patch4-pad3", 1, 17, (19, 21), ((18, 22),), 4, 1, 3),
    Case("two-keys-valid", 2, 5, (7, 9), ((8, 6), (5, 11)), tiny=True),
    Case("stride2-same", 1, 3, (9, 8), ((7, 7),), 3, 2, 1, tiny=True),
    Case("c20-tiny-key", 1, 20, (6, 5), ((5, 6), (3, 3)), 3, 1, 1, tiny=True),
    Case("patch1-valid", 1, 4, (5, 4), ((6, 3),), 1, 1, 0, tiny=True),
    Case("relu3-channels-valid", 1, 256, (14, 11), ((12, 17),)),
    Case("relu3-channels-same", 1, 256, (14, 11), ((12, 17),), 3, 1, 1),
    Case("many-channels", 1, 1100, (6, 7), ((7, 5),), 3, 1, 1),
    Case("many-channels-stride2", 1, 1100, (6, 7), ((7, 5),), 3, 2, 1),
    # Several 64-query tiles, several 64-key tiles split over blocks, descriptor length 63 * 9 = 567
    # (not a multiple of the 16/32 k-steps), a key grid that ends mid-tile.
    Case("many-tiles-and-splits", 1, 63, (41, 37), ((50, 45), (11, 70)), 3, 1, 1),
]
# Several keys of odd sizes under every geometry (and every precision).
GEOMETRIES = [(3, 1, 0), (3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 3, 2), (2, 2, 0)]
ODD_CASES = [Case(f"odd-p{p}s{s}pad{pad}", 2, 7, (13, 11), ((9, 14), (5, 5), (17, 6)), p, s, pad)
             for p, s, pad in GEOMETRIES]
PRECISIONS = list(oracle.PRECISION_TOL)
DTYPES = [torch.float32, torch.float64]
# float64 is matched exactly whatever the precision: scores and indices to 1e-10.
F64_TOL = 1e-10


def _match_inputs(case, dtype=torch.float32, seed=0):
    query = features(case.b, case.c, *case.query, seed=seed, dtype=dtype)
    keys = [features(case.b, case.c, *hw, seed=seed + 1 + i, dtype=dtype) for i, hw in enumerate(case.keys)]
    return query, keys


def check_match(kernel, query, keys, patch_size, stride, padding, precision="highest"):
    """Runs the kernel and checks docs/CONTRACT.md §4 against the oracle; returns (index, score)."""
    index, score = kernel.patch_match(query, keys, patch_size, stride, padding, precision)
    assert index.dtype == torch.int64 and score.dtype == query.dtype
    assert index.device == kernel.device and score.device == kernel.device
    exact = oracle.exact_match(query, keys, patch_size, stride, padding)
    if query.dtype == torch.float64:
        oracle.assert_match((index, score), exact, F64_TOL, score_tol=F64_TOL)
    else:
        # Every precision re-scores its answer in fp32, so the score is that of the chosen key.
        oracle.assert_match((index, score), exact, oracle.PRECISION_TOL[precision], score_tol=oracle.TOL)
    return index.cpu(), score.cpu()


@pytest.mark.parametrize("kernel, case", each([(c, d) for c in MATCH_CASES for d in DTYPES], _is_tiny))
def test_patch_match(kernel, case):
    case, dtype = case
    query, keys = _match_inputs(case, dtype)
    check_match(Kernel(kernel), query, keys, case.patch_size, case.stride, case.padding)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each(ODD_CASES))
def test_patch_match_precisions(kernel, case, precision):
    query, keys = _match_inputs(case, seed=1)
    check_match(Kernel(kernel), query, keys, case.patch_size, case.stride, case.padding, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each())
def test_patch_match_float64_any_precision(kernel, case, precision):
    query = features(2, 5, 12, 9, seed=8, dtype=torch.float64)
    keys = [features(2, 5, 8, 13, seed=9, dtype=torch.float64)]
    kernel = Kernel(kernel)
    check_match(kernel, query, keys, 3, 1, 1, precision)
    check_match(kernel, query, keys, 3, 2, 0, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each(tiny=True))
def test_patch_match_near_ties(kernel, case, precision):
    """The query is made of key patches plus small noise, so many keys lie within the tensor-core
    error of the best and the fp32 re-scoring has to pick the right one; a second key, a slightly
    perturbed copy of the first, doubles every near-tie."""
    key = features(1, 6, 8, 9, seed=3)
    query = key[:, :, 1:7, 2:9] + 1e-3 * features(1, 6, 6, 7, seed=4)
    keys = [key, key + 2e-3 * features(1, 6, 8, 9, seed=8)]
    check_match(Kernel(kernel), query, keys, 3, 1, 1, precision)


# ties: three constructions whose tied key patches are bitwise equal, so every kernel scores them
# identically and must answer the smallest index.

@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kernel, case", each(when=lambda kernel: kernel.duplicates_bit_equal))
def test_ties_constant_key(kernel, case, dtype, stride, padding):
    """A constant key given twice: every key patch of the same padding pattern is the same vector;
    the answer is the first copy of the patch the oracle picks."""
    query = features(2, 4, 7, 8, seed=6, dtype=dtype)
    key = torch.ones(2, 4, 9, 10, dtype=dtype)
    keys = [key, key.clone()]
    index, _ = Kernel(kernel).patch_match(query, keys, 3, stride, padding)
    exact = oracle.exact_match(query, keys, 3, stride, padding)
    first = oracle.first_copies(keys, 3, stride, padding)
    want = first.gather(1, exact.index.reshape(2, -1))
    assert torch.equal(index.cpu().reshape(2, -1), want)
    if padding == 0:
        assert torch.all(index == 0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each())
def test_ties_tiled_query(kernel, case, precision):
    """The key repeats the query side by side, and the key list repeats that map: every query patch
    has exact copies (score 1) at several key positions."""
    query = features(1, 6, 9, 10, seed=10)
    tiled = torch.cat([query, query], dim=3)
    index, score = check_match(Kernel(kernel), query, [tiled, tiled], 3, 1, 0, precision)
    gh, gw = oracle.grid(9, 3, 1, 0), oracle.grid(10, 3, 1, 0)
    gkw = oracle.grid(20, 3, 1, 0)
    expected = torch.arange(gh).view(gh, 1) * gkw + torch.arange(gw).view(1, gw)  # first copy
    assert torch.equal(index[0], expected)
    torch.testing.assert_close(score, torch.ones_like(score), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each(tiny=True))
def test_ties_integer_query_constant_keys(kernel, case, precision):
    """Every patch of two constant keys (1s, then 2s) has the same direction, and with integer
    queries their scores are bitwise equal in any arithmetic (2d * 1/(2n) == d * 1/n), so every
    query picks the first patch of the 1s key; a random key before them scores lower. An all-zero
    query (batch item 1) scores 0 everywhere: index 0. Under high/medium every constant-key patch is
    a candidate: the Triton list overflows and its fp32 fallback scan runs."""
    g = torch.Generator().manual_seed(5)
    query = torch.randint(2, 5, (2, 3, 5, 6), generator=g).float()
    query[1] = 0
    keys = [features(2, 3, 10, 12, seed=6), torch.ones(2, 3, 6, 7), torch.full((2, 3, 4, 4), 2.0)]
    index, score = Kernel(kernel).patch_match(query, keys, 3, 1, 0, precision)
    sim = oracle.dense_similarity(query, keys, 3, 1, 0)
    first_tied = 8 * 10
    # The construction holds (the dense float64 similarity itself rounds ties differently by column).
    assert (sim[0].max(dim=1).values - sim[0, :, first_tied]).max().item() < 1e-12
    assert (index[0] == first_tied).all() and (index[1] == 0).all()
    assert (score[1] == 0).all()
    torch.testing.assert_close(score.cpu().flatten(1).double(), sim.max(dim=2).values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kernel, case", each())
def test_zero_patches(kernel, case, precision):
    """Zero query patches score 0 against everything: index 0. Zero key patches score 0."""
    kernel = Kernel(kernel)
    query = features(1, 4, 10, 10, seed=11)
    query[..., :5, :] = 0
    key = features(1, 4, 8, 8, seed=12)
    key[..., 4:, :] = 0
    index, score = check_match(kernel, query, [key], 3, 1, 0, precision)
    assert (index[0, :3] == 0).all() and (score[0, :3] == 0).all()
    query = torch.zeros(1, 3, 6, 6)
    query[:, :, 4:, 4:] = 1.0
    index, score = check_match(kernel, query, [features(1, 3, 7, 7, seed=7)], 3, 1, 0, precision)
    assert torch.all(score[:, :1, :1] == 0) and torch.all(index[:, :1, :1] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("kernel, case", each())
def test_planted_patches(kernel, case, padding, dtype):
    """Key = query shifted: every interior query patch has an exact copy (score 1)."""
    base = features(1, 7, 20, 24, seed=5, dtype=dtype)
    query, key = base[:, :, 2:18, 3:21].contiguous(), base[:, :, 4:20, :22].contiguous()
    index, score = check_match(Kernel(kernel), query, [key], 3, 1, padding)
    if padding == 0:
        gk_w = key.shape[3] - 2
        i, j = torch.meshgrid(torch.arange(12), torch.arange(16), indexing="ij")
        assert torch.equal(index[:, 2:14, :16][:, :12, :], (i * gk_w + j + 3)[None])
        torch.testing.assert_close(score[:, 2:14], torch.ones_like(score[:, 2:14]))


@pytest.mark.parametrize("kernel, case", each())
def test_patch_match_non_contiguous_inputs(kernel, case):
    kernel = Kernel(kernel)
    base = features(2, 9, 14, 16, seed=15)
    query = base.transpose(2, 3)[:, 1::2]
    key = base[:, ::2]
    assert not query.is_contiguous() and not key.is_contiguous()
    check_match(kernel, query, [key[:, :4], base[:, 1::2].flip(3)], 3, 1, 1)
    query = features(2, 6, 11, 13, seed=13).transpose(2, 3)
    key = features(2, 6, 12, 10, seed=14)[:, :, ::2]
    check_match(kernel, query, [key], 3, 1, 1)


@st.composite
def match_problems(draw):
    p, stride, padding = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    size = st.integers(max(1, p - 2 * padding), 19)
    b, c, seed = draw(st.integers(1, 2)), draw(st.integers(1, 20)), draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(DTYPES))
    query = features(b, c, draw(size), draw(size), dtype=dtype, seed=seed)
    keys = [features(b, c, draw(size), draw(size), dtype=dtype, seed=seed + 1 + i)
            for i in range(draw(st.integers(1, 3)))]
    return query, keys, p, stride, padding


@pytest.mark.parametrize("kernel, case", each())
def test_patch_match_random_shapes(kernel, case):
    kernel = Kernel(kernel)

    @settings(max_examples=30, deadline=None)
    @given(problem=match_problems())
    def run(problem):
        check_match(kernel, *problem)

    run()


# ---------------------------------------------------------------------------------------------
# feature_swap

@dataclass(frozen=True)
class SwapCase:
    id: str
    b: int
    cv: int
    q_grid: tuple
    values: tuple  # value map sizes (key map size * scale, plus any leftover)
    patch_size: int = 3
    stride: int = 1
    padding: int = 0
    scale: int = 1
    out_size: tuple | None = None
    tiny: bool = False


def _odd_values(refs, scale):
    # Value maps with a leftover beyond key map * scale (odd sizes).
    return tuple((h * scale + scale // 2, w * scale + (scale > 1)) for h, w in refs)


SWAP_CASES = [
    SwapCase("valid", 1, 2, (4, 5), ((6, 5),)),
    SwapCase("same-two-values", 2, 3, (6, 7), ((5, 8), (7, 4)), 3, 1, 1),
    SwapCase("x2", 1, 2, (3, 4), ((10, 12),), 3, 1, 0, 2),
    SwapCase("same-x4", 1, 3, (5, 5), ((16, 12), (8, 20)), 3, 1, 1, 4),
    SwapCase("stride2-same-x2", 2, 2, (5, 4), ((14, 12),), 3, 2, 1, 2),
    SwapCase("patch2-stride3", 1, 1, (2, 2), ((9, 9),), 2, 3, 0),
    SwapCase("x2-larger-out", 1, 2, (4, 4), ((12, 12),), 3, 1, 0, 2, (9, 15)),
    SwapCase("smaller-out", 1, 2, (8, 7), ((7, 9),), 3, 1, 1, 1, (3, 4)),
    SwapCase("stride2-larger-out", 1, 2, (4, 3), ((10, 10),), 3, 2, 0, 1, (14, 12)),
    SwapCase("two-values-valid", 2, 3, (4, 5), ((6, 5), (5, 7)), 3, 1, 0, 1, (6, 7), tiny=True),
    SwapCase("stride2-same-x2-odd", 1, 5, (3, 3), ((11, 13),), 3, 2, 1, 2, (11, 10), tiny=True),
    SwapCase("same-x4-tiny", 1, 2, (3, 2), ((8, 8),), 3, 1, 1, 4, (12, 8), tiny=True),
] + [
    SwapCase(f"odd-p{p}s{s}pad{pad}x{scale}", 2, 5, (oracle.grid(11, p, s, pad), oracle.grid(8, p, s, pad)),
             _odd_values(((7, 9), (5, 6)), scale), p, s, pad, scale)
    for p, s, pad, scale in [(3, 1, 0, 1), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 4), (3, 2, 1, 2),
                             (2, 2, 0, 3), (1, 1, 0, 2), (5, 3, 2, 1)]
]
# fp32 swaps add at most patch_size^2 rounded values: 1e-5; float64 is exact to rounding.
SWAP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _swap_inputs(case, dtype, seed=0):
    values = [features(case.b, case.cv, *hw, seed=seed + i, dtype=dtype) for i, hw in enumerate(case.values)]
    values = [v - 0.2 for v in values]  # signed values, as relu-free levels have
    index = random_index(values, case.q_grid, case.patch_size, case.stride, case.padding, case.scale,
                         seed=seed + 7)
    index[0, 0, :] = index[0, 0, 0]  # several query cells on one key cell
    geometry = (case.patch_size, case.stride, case.padding, case.scale)
    out = case.out_size or oracle.default_out_size(case.q_grid, *geometry)
    return values, index, geometry, out


def check_swap(kernel, values, index, geometry, out_size, reduce, tol):
    """Forward against the oracle, backward against the oracle's autograd, and the backward run
    twice is bitwise the same; returns the output."""
    out = kernel.feature_swap(values, index, *geometry, *out_size, reduce)
    want = oracle.feature_swap(values, index, *geometry, out_size, reduce)
    assert out.dtype == values[0].dtype and out.shape == want.shape and out.device == kernel.device
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    if out.numel() == 0:
        return out
    grad_out = features(*out.shape, seed=12, dtype=values[0].dtype) - 0.2
    sizes = [n for v in values for n in v.shape[-2:]]
    grads = kernel.feature_swap_backward(grad_out, index, sizes, *geometry, reduce)
    wants = oracle.feature_swap_grads(values, index, grad_out, *geometry, out_size, reduce)
    assert len(grads) == len(values)
    for got, want, v in zip(grads, wants, values, strict=True):
        assert got.dtype == v.dtype and got.shape == v.shape
        torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)
    again = kernel.feature_swap_backward(grad_out, index, sizes, *geometry, reduce)
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)), "backward is not deterministic"
    return out


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kernel, case", each([(c, d) for c in SWAP_CASES for d in DTYPES], _is_tiny))
def test_feature_swap(kernel, case, reduce):
    case, dtype = case
    values, index, geometry, out_size = _swap_inputs(case, dtype)
    check_swap(Kernel(kernel), values, index, geometry, out_size, reduce, SWAP_TOL[dtype])


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_many_values(kernel, case, reduce):
    # More value maps than one CUDA launch takes (8): chunked accumulation.
    refs = tuple((4 + r % 3, 5) for r in range(11))
    swap = SwapCase("many", 2, 5, (oracle.grid(11, 3, 1, 1), oracle.grid(8, 3, 1, 1)), _odd_values(refs, 2),
                    3, 1, 1, 2)
    values, index, geometry, out_size = _swap_inputs(swap, torch.float64, seed=3)
    check_swap(Kernel(kernel), values, index, geometry, out_size, reduce, 1e-12)


@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_backward_one_key(kernel, case):
    """Every query cell matched to one key cell: one bucket holds all of them."""
    values = [features(1, 3, 12, 12, seed=2, dtype=torch.float64)]
    index = torch.full((1, 10, 10), 37, dtype=torch.int64)
    check_swap(Kernel(kernel), values, index, (3, 1, 0, 1), (12, 12), "mean", 1e-12)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_backward_heavy_buckets(kernel, case, reduce):
    """Buckets longer than a chunk of the GPU backward (256 sorted positions): 700 cells on key 0,
    300 on key 5 (a heavy bucket that starts inside a chunk), the rest spread; two batch items."""
    g = torch.Generator().manual_seed(7)
    values = [features(2, 3, 40, 40, seed=5, dtype=torch.float64)]
    n = 38 * 38
    flat = torch.randint(0, n, (2, n), generator=g)
    flat[:, :700] = 0
    flat[:, 700:1000] = 5
    index = flat[:, torch.randperm(n, generator=g)].reshape(2, 38, 38).contiguous()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        check_swap(Kernel(kernel), [v.to(dtype) for v in values], index, (3, 1, 0, 1), (40, 40), reduce, tol)


@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_uncovered_pixels_are_zero(kernel, case):
    values, index, geometry, _ = _swap_inputs(SWAP_CASES[8], torch.float64)
    out = Kernel(kernel).feature_swap(values, index, *geometry, 14, 12, "mean")
    assert torch.all(out[:, :, 11:] == 0) and torch.all(out[:, :, :, 9:] == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_backward_is_the_adjoint(kernel, case, reduce):
    """<swap(v), g> = <v, swap^T(g)> in float64."""
    kernel = Kernel(kernel)
    swap = SwapCase("adjoint", 2, 4, (11, 10), ((22, 18), (14, 26)), 3, 1, 1, 2)
    values, index, geometry, (oh, ow) = _swap_inputs(swap, torch.float64, seed=3)
    grad_out = features(2, 4, oh, ow, seed=4, dtype=torch.float64)
    out = kernel.feature_swap(values, index, *geometry, oh, ow, reduce).cpu()
    grads = kernel.feature_swap_backward(grad_out, index, [n for v in values for n in v.shape[2:]], *geometry,
                                         reduce)
    rhs = sum((g.cpu() * v).sum() for g, v in zip(grads, values, strict=True))
    torch.testing.assert_close((out * grad_out).sum(), rhs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kernel, case", each(tiny=True))
def test_feature_swap_half(kernel, case, dtype):
    """float16/bfloat16 are swapped in float32 and rounded once: equal to the float32 swap rounded,
    with two value maps and 9-window sums. A backend that sums in ``dtype`` (the torch backend) is
    within ``dtype``'s rounding of a sum of up to patch_size^2 values."""
    if not kernel.half_rounds_once:
        values = [features(1, 4, 12, 14, seed=2) - 0.2]
        index = random_index(values, (5, 4), scale=2)
        kernel = Kernel(kernel)
        out = kernel.feature_swap([v.to(dtype) for v in values], index, 3, 1, 0, 2, 14, 12, "mean")
        want = kernel.feature_swap([v.to(dtype).float() for v in values], index, 3, 1, 0, 2, 14, 12, "mean")
        assert out.dtype == dtype
        eps = torch.finfo(dtype).eps
        bound = 9 * eps * max(v.abs().max().item() for v in values)
        torch.testing.assert_close(out.float(), want, atol=bound, rtol=eps)
        return
    kernel = Kernel(kernel)
    values = [(features(1, 3, 7, 8, seed=21 + i) * 40).to(dtype) for i in range(2)]
    index = torch.randint(0, 2 * 30, (1, 5, 6), generator=torch.Generator().manual_seed(23))
    grad_out = (features(1, 3, 7, 8, seed=24) * 40).to(dtype)
    for reduce in ("sum", "mean"):
        out = kernel.feature_swap(values, index, 3, 1, 0, 1, 7, 8, reduce)
        wide = kernel.feature_swap([v.float() for v in values], index, 3, 1, 0, 1, 7, 8, reduce)
        assert out.dtype == dtype
        torch.testing.assert_close(out, wide.to(dtype), atol=0, rtol=0)
        grads = kernel.feature_swap_backward(grad_out, index, [7, 8, 7, 8], 3, 1, 0, 1, reduce)
        wide = kernel.feature_swap_backward(grad_out.float(), index, [7, 8, 7, 8], 3, 1, 0, 1, reduce)
        # NB: the Triton interpreter truncates float32 -> bfloat16 in kernel stores (a GPU rounds to nearest).
        ulp = 2.0**-7 if kernel.case.interpreted and dtype == torch.bfloat16 else 0.0
        for got, want in zip(grads, wide, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=ulp)


@pytest.mark.parametrize("kernel, case", each(tiny=True, when=lambda kernel: kernel.mean_rounds_to_nearest))
def test_feature_swap_mean_is_correctly_rounded(kernel, case):
    """The mean divides with round-to-nearest: the float32 rounding of the float64 quotient of the
    float32 sum (an approximate division, as '/' compiles to on a GPU, is off by an ulp here and there)."""
    kernel = Kernel(kernel)
    values = [features(1, 4, 9, 9, seed=25) * 3 + 1]
    index = torch.randint(0, 49, (1, 7, 7), generator=torch.Generator().manual_seed(26))
    total = kernel.feature_swap(values, index, 3, 1, 0, 1, 9, 9, "sum")
    mean = kernel.feature_swap(values, index, 3, 1, 0, 1, 9, 9, "mean")
    count = kernel.feature_swap([torch.ones_like(values[0])], index, 3, 1, 0, 1, 9, 9, "sum")
    want = (total.double() / count.double()).float()
    assert torch.equal(mean, want), f"{int((mean != want).sum())} pixels not correctly rounded"


@st.composite
def swap_problems(draw):
    p, stride, padding = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    scale = draw(st.integers(1, 3))
    size = st.integers(max(1, p - 2 * padding), 9)
    vsizes = tuple((draw(size) * scale, draw(size) * scale) for _ in range(draw(st.integers(1, 2))))
    q_grid = (oracle.grid(draw(size), p, stride, padding), oracle.grid(draw(size), p, stride, padding))
    out_size = draw(st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(0, 20))))
    case = SwapCase("random", draw(st.integers(1, 2)), 2, q_grid, vsizes, p, stride, padding, scale, out_size)
    return case, draw(st.sampled_from(["sum", "mean"])), draw(st.integers(0, 999))


@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_random_shapes(kernel, case):
    kernel = Kernel(kernel)

    @settings(max_examples=30, deadline=None)
    @given(problem=swap_problems())
    def run(problem):
        swap, reduce, seed = problem
        values, index, geometry, out_size = _swap_inputs(swap, torch.float64, seed=seed)
        assume(min(out_size) >= 0)  # the default size can be negative for tiny grids
        check_swap(kernel, values, index, geometry, out_size, reduce, 1e-12)

    run()


# ---------------------------------------------------------------------------------------------
# gradients and bad input, through the public ops (routed to each backend)

@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("kernel, case", each())
def test_feature_swap_gradcheck(kernel, case, reduce):
    kernel = Kernel(kernel)
    values = [features(1, 2, 8, 6, seed=1, dtype=torch.float64).to(kernel.device).requires_grad_(),
              features(1, 2, 6, 10, seed=2, dtype=torch.float64).to(kernel.device).requires_grad_()]
    index = random_index(values, (3, 4), padding=1, scale=2, seed=3)

    def swap(v0, v1):
        return torch.ops.srntt.feature_swap([v0, v1], index, 3, 1, 1, 2, 6, 8, reduce, kernel.case.name)

    assert torch.autograd.gradcheck(swap, tuple(values), fast_mode=True)


@pytest.mark.parametrize("kernel, case", each())
def test_patch_match_score_gradcheck(kernel, case):
    kernel = Kernel(kernel)
    query = features(1, 2, 5, 6, seed=11, dtype=torch.float64).to(kernel.device).requires_grad_()
    key = features(1, 2, 5, 5, seed=12, dtype=torch.float64).to(kernel.device).requires_grad_()
    # gradcheck perturbs inputs by 1e-6: the argmax must not flip, so the maxima must be clear.
    assert oracle.exact_match(query, key, 3, 1, 1).margin.min().item() > 1e-4

    def score(q, k):
        return torch.ops.srntt.patch_match(q, [k], 3, 1, 1, kernel.case.name, "highest")[0]

    assert torch.autograd.gradcheck(score, (query, key), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kernel, case", each(tiny=True))
def test_bad_input_is_named_before_the_kernel(kernel, case):
    """The ops check their arguments for every backend alike: a ValueError naming the argument."""
    name, dev = kernel.name, kernel.device
    Kernel(kernel)
    q, k = features(1, 3, 7, 8, device=dev), features(1, 3, 6, 9, seed=1, device=dev)
    with pytest.raises(ValueError, match="patch_size"):
        torch.ops.srntt.patch_match(q, [k], 0, 1, 0, name, "highest")
    with pytest.raises(ValueError, match="precision"):
        torch.ops.srntt.patch_match(q, [k], 3, 1, 0, name, "low")
    with pytest.raises(ValueError, match="key"):
        torch.ops.srntt.patch_match(q, [k[..., :2, :]], 3, 1, 0, name, "highest")
    bad = q.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="query: contains NaN or Inf"):
        torch.ops.srntt.patch_match(bad, [k], 3, 1, 0, name, "highest")
    index = torch.zeros(1, 5, 6, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="index"):
        torch.ops.srntt.feature_swap([k], index + 1000, 3, 1, 0, 1, 7, 8, "sum", name)
    with pytest.raises(ValueError, match="reduce"):
        torch.ops.srntt.feature_swap([k], index, 3, 1, 0, 1, 7, 8, "max", name)


# ---------------------------------------------------------------------------------------------
# the kernel-level schemas of every backend agree

KERNEL_OPS = sorted(n.removeprefix("srntt::") for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("srntt::_") and "_fused" in n)
# Sample arguments by name, for calling any kernel-level op on tiny inputs.
SAMPLES = {
    "query": lambda: features(1, 2, 5, 6, seed=1),
    "keys": lambda: [features(1, 2, 6, 5, seed=2)],
    "values": lambda: [features(1, 2, 6, 5, seed=3)],
    "index": lambda: torch.zeros(1, 3, 4, dtype=torch.int64),
    "grad_out": lambda: features(1, 2, 5, 6, seed=4),
    "value_sizes": lambda: [6, 5],
    "patch_size": lambda: 3, "stride": lambda: 1, "padding": lambda: 0, "scale": lambda: 1,
    "out_h": lambda: 5, "out_w": lambda: 6, "precision": lambda: "highest", "reduce": lambda: "mean",
    "k": lambda: 2,
}


def _python_name(op: str) -> str:
    """The Python name of a kernel-level op: ``_feature_swap_fused_backward`` -> ``feature_swap_backward``."""
    return op.removeprefix("_").replace("_fused", "")


def _arity(out) -> str:
    if isinstance(out, torch.Tensor):
        return "Tensor"
    if isinstance(out, list):
        return "Tensor[]"
    return f"{len(out)} Tensors"


def _schema_arity(schema) -> str:
    if len(schema.returns) == 1:
        return "Tensor[]" if str(schema.returns[0].type) == "List[Tensor]" else "Tensor"
    return f"{len(schema.returns)} Tensors"


def _signatures(python_name):
    """The Python functions that must take the op's arguments: the torch backend's (required: it runs
    everything) and the ``dispatch.Backend`` method (where the op has one)."""
    out = {"torch_backend": getattr(torch_backend, python_name, None)}
    if hasattr(dispatch.Backend, python_name):
        out["dispatch.Backend"] = getattr(dispatch.Backend, python_name)
    return out


@pytest.mark.skipif(not extension.LOADED, reason=f"srntt_core._C not loaded: {extension.LOAD_ERROR}")
def test_kernel_ops_are_found():
    assert {"_patch_match_fused", "_feature_swap_fused", "_feature_swap_fused_backward"} <= set(KERNEL_OPS)


@pytest.mark.skipif(not extension.LOADED, reason=f"srntt_core._C not loaded: {extension.LOAD_ERROR}")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernel_schemas_agree(op):
    """Every backend's kernel-level entry takes the ``srntt::_*_fused`` op's arguments (names, order,
    count) and returns as many outputs: the torch backend's function, the ``dispatch.Backend``
    method, the Triton op's schema, and every backend that runs here, called on tiny inputs.
    A new op in the namespace is checked without changing this test."""
    schema = getattr(torch.ops.srntt, op).default._schema
    names = [a.name for a in schema.arguments]
    missing = [n for n in names if n not in SAMPLES]
    assert not missing, f"srntt::{op}: add sample arguments for {missing} to SAMPLES"
    args = [SAMPLES[n]() for n in names]
    want = _schema_arity(schema)
    assert _arity(getattr(torch.ops.srntt, op)(*args)) == want
    python_name = _python_name(op)
    signatures = _signatures(python_name)
    assert signatures["torch_backend"] is not None, f"the torch backend has no {python_name}"
    for where, fn in signatures.items():
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert params == names, f"{where}.{python_name}{params} != srntt::{op}{names}"
    assert _arity(signatures["torch_backend"](*args)) == want, f"torch_backend.{python_name}"
    triton_op = op.replace("_fused", "_triton")
    if hasattr(torch.ops.srntt, triton_op):
        triton_schema = getattr(torch.ops.srntt, triton_op).default._schema
        assert [a.name for a in triton_schema.arguments] == names, triton_schema
        assert _schema_arity(triton_schema) == want, triton_schema
    for name in dispatch.BACKENDS:
        impl = dispatch.get(name)
        if hasattr(impl, python_name) and not impl.not_supported_reasons(torch.device("cpu")):
            assert _arity(getattr(impl, python_name)(*args)) == want, f"backend {name!r}: {python_name}"
