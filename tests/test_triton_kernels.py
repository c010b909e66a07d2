"""Low-level tests of the Triton kernels (kernels/, ops srntt::_*_triton) against float64 references.

They run on a CUDA device when there is one, otherwise on the CPU under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest before anything imports `srntt_core._triton`). The interpreter is slow,
so every shape here is tiny; odd sizes still straddle the tiles (16-64 wide under the interpreter).
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before srntt_core._triton is imported",
        allow_module_level=True,
    )

from test_flat_images import DECIDABLE, flat_features  # noqa: E402, F401 (a fixture)

from srntt_core import _triton as kernels  # noqa: E402

if not kernels.AVAILABLE:
    pytest.skip(kernels.UNAVAILABLE_REASON, allow_module_level=True)

# NB: with TRITON_INTERPRET=1 the kernels run on host memory, so the tensors stay on the CPU.
DEVICE = "cpu" if INTERPRET else "cuda"
EPS = 1e-12
# docs/CONTRACT.md §4: the chosen key's exact score must be within tol of the exact maximum.
PRECISION_TOL = {"highest": 1e-5, "high": 1e-3, "medium": 2e-3}


def grid(size, patch_size, stride, padding):
    return (size + 2 * padding - patch_size) // stride + 1


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).clamp_min(-0.3).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# float64 references


def similarity_ref(query, keys, patch_size, stride, padding):
    """Dense (B, Nq, Nk) float64 cosine similarities over the concatenated key grids (tiny sizes)."""

    def unit(x):
        d = F.unfold(x.detach().double().cpu(), patch_size, padding=padding, stride=stride)
        return d / d.norm(dim=1, keepdim=True).clamp_min(EPS)

    return torch.bmm(unit(query).transpose(1, 2), torch.cat([unit(k) for k in keys], dim=2))


def check_match(index, score, sim, tol):
    """docs/CONTRACT.md §4 against the dense float64 similarities: exact index where the top-2 margin > tol,
    chosen key within tol of the max, and the returned score is the chosen key's score."""
    b = index.shape[0]
    index, score = index.cpu().reshape(b, -1), score.cpu().reshape(b, -1).double()
    assert index.dtype == torch.int64
    assert index.min().item() >= 0 and index.max().item() < sim.shape[2]
    best = sim.max(dim=2)
    chosen = sim.gather(2, index[..., None])[..., 0]
    if sim.shape[2] > 1:
        top2 = sim.topk(2, dim=2).values
        sure = top2[..., 0] - top2[..., 1] > tol
        assert torch.equal(index[sure], best.indices[sure])
    assert (best.values - chosen).max().item() <= tol
    # Every precision re-scores its answer in fp32 (or float64), so the score is that of the key.
    torch.testing.assert_close(score, chosen, atol=1e-5, rtol=0)


def feature_swap_ref(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce):
    """docs/CONTRACT.md §3 with unfold / gather / fold in float64; differentiable w.r.t. values."""
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    b = index.shape[0]
    gqh, gqw = index.shape[1:]
    windows = []
    for v in values:
        gkh = grid(v.shape[2] // scale, patch_size, stride, padding)
        gkw = grid(v.shape[3] // scale, patch_size, stride, padding)
        lh, lw = grid(v.shape[2], win, step, pad), grid(v.shape[3], win, step, pad)
        cols = F.unfold(v.double(), win, padding=pad, stride=step).view(b, -1, lh, lw)
        windows.append(cols[:, :, :gkh, :gkw].reshape(b, cols.shape[1], gkh * gkw))
    windows = torch.cat(windows, dim=2)
    picked = windows.gather(2, index.cpu().reshape(b, 1, -1).expand(-1, windows.shape[1], -1))
    # Unpadded canvas: canvas row y is output row y - pad; then cropped / zero-extended.
    ch, cw = (gqh - 1) * step + win, (gqw - 1) * step + win
    canvas = F.fold(picked, (ch, cw), win, stride=step)
    count = F.fold(torch.ones_like(picked[:1, :1].expand(1, win * win, -1)), (ch, cw), win, stride=step)
    out = canvas.new_zeros((b, canvas.shape[1], out_h, out_w))
    cnt = canvas.new_zeros((1, 1, out_h, out_w))
    h, w = min(ch - pad, out_h), min(cw - pad, out_w)
    out[:, :, :h, :w] = canvas[:, :, pad : pad + h, pad : pad + w]
    cnt[:, :, :h, :w] = count[:, :, pad : pad + h, pad : pad + w]
    if reduce == "mean":
        out = torch.where(cnt > 0, out / cnt.clamp_min(1), 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# patch_match

# (batch, channels, query (H, W), key sizes, patch_size, stride, padding)
MATCH_CASES = [
    pytest.param(2, 5, (7, 9), [(8, 6), (5, 11)], 3, 1, 0, id="two-keys-valid"),
    pytest.param(1, 3, (9, 8), [(7, 7)], 3, 2, 1, id="stride2-same"),
    pytest.param(1, 20, (6, 5), [(5, 6), (3, 3)], 3, 1, 1, id="c20-same-tiny-key"),
    pytest.param(1, 4, (5, 4), [(6, 3)], 1, 1, 0, id="patch1"),
]


@pytest.mark.parametrize("b, c, q_size, k_sizes, patch_size, stride, padding", MATCH_CASES)
def test_patch_match_highest(b, c, q_size, k_sizes, patch_size, stride, padding):
    query = rand(b, c, *q_size, seed=1)
    keys = [rand(b, c, *hw, seed=2 + i) for i, hw in enumerate(k_sizes)]
    index, score = kernels.patch_match(query, keys, patch_size, stride, padding, "highest")
    gq = (grid(q_size[0], patch_size, stride, padding), grid(q_size[1], patch_size, stride, padding))
    assert index.shape == score.shape == (b, *gq)
    assert score.dtype == torch.float32 and index.device == query.device
    check_match(index, score, similarity_ref(query, keys, patch_size, stride, padding), 1e-5)


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_patch_match_precision_contract(precision):
    """Near-ties: the query is made of key patches plus small noise, so many keys lie within the
    tensor-core error of the best and the fp32 re-scoring has to pick the right one; a second key,
    a slightly perturbed copy of the first, doubles every near-tie."""
    key = rand(1, 6, 8, 9, seed=3)
    query = key[:, :, 1:7, 2:9] + 1e-3 * rand(1, 6, 6, 7, seed=4)
    keys = [key, key + 2e-3 * rand(1, 6, 8, 9, seed=8)]
    index, score = kernels.patch_match(query, keys, 3, 1, 1, precision)
    check_match(index, score, similarity_ref(query, keys, 3, 1, 1), PRECISION_TOL[precision])


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_patch_match_ties_smallest_index(precision):
    """Exact ties: every patch of two constant keys (1s, then 2s) has the same direction, and with
    integer queries their scores are bitwise equal in any arithmetic (2d * 1/(2n) == d * 1/n), so
    every query picks the first patch of the 1s key; a random key before them (two key tiles under
    the interpreter) scores lower. An all-zero query (batch item 1) scores 0 everywhere: index 0.
    Under high/medium every constant-key patch is a candidate: the list overflows and the fp32
    fallback scan runs, pruning the random key's tiles."""
    g = torch.Generator().manual_seed(5)
    query = torch.randint(2, 5, (2, 3, 5, 6), generator=g).float()
    query[1] = 0
    keys = [rand(2, 3, 10, 12, seed=6).cpu(), torch.ones(2, 3, 6, 7), torch.full((2, 3, 4, 4), 2.0)]
    query, keys = query.to(DEVICE), [k.to(DEVICE) for k in keys]
    index, score = kernels.patch_match(query, keys, 3, 1, 0, precision)
    sim = similarity_ref(query, keys, 3, 1, 0)
    first_tied = 8 * 10
    # The construction holds (the dense float64 reference itself rounds ties differently by column).
    assert (sim[0].max(dim=1).values - sim[0, :, first_tied]).max().item() < 1e-12
    assert (index[0] == first_tied).all() and (index[1] == 0).all()
    assert (score[1] == 0).all()
    torch.testing.assert_close(score.cpu().flatten(1).double(), sim.max(dim=2).values, atol=1e-6, rtol=0)


def test_patch_match_float64():
    query = rand(1, 4, 6, 7, seed=6, dtype=torch.float64)
    keys = [rand(1, 4, 5, 8, seed=7, dtype=torch.float64)]
    index, score = kernels.patch_match(query, keys, 3, 2, 1, "medium")  # float64 ignores precision
    assert score.dtype == torch.float64
    sim = similarity_ref(query, keys, 3, 2, 1)
    assert torch.equal(index.cpu().flatten(1), sim.max(dim=2).indices)
    torch.testing.assert_close(score.cpu().flatten(1), sim.max(dim=2).values, atol=1e-12, rtol=0)


def test_patch_match_flat_image_true_maximum(flat_features):  # noqa: F811 (the fixture)
    """Flat regions of a real slide (ppt3 crops, relu3_1): keys within the float32 noise of the
    best are re-scored in float64, so every cell whose exact top-2 margin is decidable gets the
    true maximum (as the float64 oracle), and the rest stay within float64 rounding of it."""
    query, key = (x[:, :, 10:22, :16].to(DEVICE) for x in flat_features)  # 43 runner-ups within 1e-5
    index, score = kernels.patch_match(query, [key], 3, 1, 1, "highest")
    sim = similarity_ref(query, [key], 3, 1, 1)[0]
    top2 = sim.topk(2, dim=1).values
    decidable = top2[:, 0] - top2[:, 1] > DECIDABLE
    index = index.cpu().reshape(-1)
    wrong = (index != sim.argmax(dim=1)) & decidable
    assert not wrong.any(), f"{int(wrong.sum())} of {int(decidable.sum())} decidable cells miss the maximum"
    assert (top2[:, 0] - sim.gather(1, index[:, None]).squeeze(1)).max().item() <= DECIDABLE
    # What the image is for: many cells with a runner-up within the float32 noise.
    assert ((top2[:, 0] - top2[:, 1]) < 1e-5).sum().item() >= 10


def topk_ref(sim, k):
    """The k best keys of the dense float64 similarities: score descending, ties by smallest index."""
    order = torch.sort(sim, dim=-1, descending=True, stable=True)
    return order.indices[..., :k], order.values[..., : k + 1]


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_patch_match_topk(precision):
    """Top-k over two key maps, sorted, ties by smallest index: the float64 top-k wherever its
    order is decidable (gaps above float64 rounding), every score that of its key; zero query
    patches (batch item 1's corner) get keys 0..k-1 with score 0."""
    query = rand(2, 5, 6, 7, seed=40)
    query[1, :, :3, :3] = 0
    keys = [rand(2, 5, 7, 6, seed=41), rand(2, 5, 4, 5, seed=42)]
    k = 5
    index, score = kernels.patch_match_topk(query, keys, 3, 1, 1, precision, k)
    assert index.shape == score.shape == (2, 6, 7, k) and index.dtype == torch.int64
    sim = similarity_ref(query, keys, 3, 1, 1)
    want_i, want_v = topk_ref(sim, k)
    index, score = index.cpu().flatten(1, 2), score.cpu().flatten(1, 2).double()
    gaps = want_v[..., :-1] - want_v[..., 1:]
    decidable = (gaps[..., :k] > 1e-9) & torch.cat([torch.ones_like(gaps[..., :1], dtype=torch.bool),
                                                      gaps[..., : k - 1] > 1e-9], dim=-1)
    assert decidable.float().mean() > 0.9
    assert torch.equal(index[decidable], want_i[decidable])
    torch.testing.assert_close(score, sim.gather(2, index), atol=1e-6, rtol=0)
    torch.testing.assert_close(score, want_v[..., :k], atol=1e-6, rtol=0)
    assert torch.equal(index[1, 0], torch.arange(k)) and (score[1, 0] == 0).all()


def test_patch_match_topk_ties_and_float64():
    """Exact ties (two constant keys, integer queries) go to the smallest indices in order; float64
    inputs are scored exactly; k out of range is refused naming k."""
    g = torch.Generator().manual_seed(43)
    query = torch.randint(2, 5, (1, 3, 5, 6), generator=g).float().to(DEVICE)
    keys = [rand(1, 3, 6, 7, seed=44), torch.ones(1, 3, 6, 7, device=DEVICE), torch.full((1, 3, 4, 4), 2.0,
                                                                                           device=DEVICE)]
    index, _ = kernels.patch_match_topk(query, keys, 3, 1, 0, "highest", 3)
    first_tied = 4 * 5
    assert (index.cpu() == torch.arange(first_tied, first_tied + 3)).all()
    q64 = rand(1, 4, 6, 7, seed=45, dtype=torch.float64)
    k64 = [rand(1, 4, 5, 8, seed=46, dtype=torch.float64)]
    index, score = kernels.patch_match_topk(q64, k64, 3, 1, 1, "highest", 4)
    want_i, want_v = topk_ref(similarity_ref(q64, k64, 3, 1, 1), 4)
    assert score.dtype == torch.float64 and torch.equal(index.cpu().flatten(1, 2), want_i)
    torch.testing.assert_close(score.cpu().flatten(1, 2), want_v[..., :4], atol=1e-12, rtol=0)
    for bad in (0, 65, 5 * 8 + 1):
        with pytest.raises(ValueError, match="k"):
            kernels.patch_match_topk(q64, k64, 3, 1, 1, "highest", bad)


# ---------------------------------------------------------------------------------------------
# feature_swap

# (batch, value channels, query grid, value sizes, patch_size, stride, padding, scale, out size)
SWAP_CASES = [
    pytest.param(2, 3, (4, 5), [(6, 5), (5, 7)], 3, 1, 0, 1, (6, 7), id="two-values-valid"),
    pytest.param(1, 5, (3, 3), [(11, 13)], 3, 2, 1, 2, (11, 10), id="stride2-same-x2-odd-sizes"),
    pytest.param(1, 2, (3, 2), [(8, 8)], 3, 1, 1, 4, (12, 8), id="same-x4"),
]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("b, cv, q_grid, v_sizes, patch_size, stride, padding, scale, out_size", SWAP_CASES)
def test_feature_swap_forward_backward(
    b, cv, q_grid, v_sizes, patch_size, stride, padding, scale, out_size, reduce
):
    values = [rand(b, cv, *hw, seed=10 + i) for i, hw in enumerate(v_sizes)]
    n_keys = sum(
        grid(h // scale, patch_size, stride, padding) * grid(w // scale, patch_size, stride, padding)
        for h, w in v_sizes
    )
    g = torch.Generator().manual_seed(11)
    index = torch.randint(0, n_keys, (b, *q_grid), generator=g).to(DEVICE)
    args = (patch_size, stride, padding, scale)

    out = kernels.feature_swap(values, index, *args, *out_size, reduce)
    leaves = [v.detach().cpu().double().requires_grad_() for v in values]
    expected = feature_swap_ref(leaves, index, *args, *out_size, reduce)
    assert out.shape == expected.shape and out.dtype == values[0].dtype
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-5)

    grad_out = rand(*expected.shape, seed=12)
    sizes = [s for hw in v_sizes for s in hw]
    grads = kernels.feature_swap_backward(grad_out, index, sizes, *args, reduce)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.cpu().double())
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.shape == want.shape and got.dtype == grad_out.dtype
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_feature_swap_backward_deterministic():
    """Many query cells matched to few key cells (heavy fan-in): bitwise equal across runs."""
    g = torch.Generator().manual_seed(14)
    index = torch.randint(0, 3, (1, 4, 4), generator=g).to(DEVICE)
    grad_out = rand(1, 2, 6, 6, seed=15)
    first = kernels.feature_swap_backward(grad_out, index, [5, 5], 3, 1, 0, 1, "mean")
    again = kernels.feature_swap_backward(grad_out, index, [5, 5], 3, 1, 0, 1, "mean")
    assert torch.equal(first[0], again[0])


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_feature_swap_backward_heavy_lists(reduce):
    """Inverse lists longer than a chunk: 42 of 63 query cells matched to key 0 (as zero patches
    are), 9 to key 5 (a chunk plus one), the rest spread: the chunk sums added in chunk order give
    the reference gradient, bitwise the same on a second run, and float16 sums in float32."""
    module = sys.modules["srntt_core._triton.feature_swap"]
    assert module._CHUNK < 9 < 42
    g = torch.Generator().manual_seed(30)
    index = torch.cat([torch.zeros(42), torch.full((9,), 5), torch.randint(1, 64, (12,), generator=g)])
    index = index[torch.randperm(63, generator=g)].long().view(1, 9, 7).to(DEVICE)
    grad_out = rand(1, 3, 9, 7, seed=31)
    grads = kernels.feature_swap_backward(grad_out, index, [8, 8], 3, 1, 1, 1, reduce)
    leaf = torch.zeros(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = feature_swap_ref([leaf], index, 3, 1, 1, 1, 9, 7, reduce)
    (want,) = torch.autograd.grad(expected, [leaf], grad_out.cpu().double())
    torch.testing.assert_close(grads[0].cpu().double(), want, atol=1e-5, rtol=1e-5)
    again = kernels.feature_swap_backward(grad_out, index, [8, 8], 3, 1, 1, 1, reduce)
    assert torch.equal(again[0], grads[0])
    half = kernels.feature_swap_backward(grad_out.half(), index, [8, 8], 3, 1, 1, 1, reduce)[0]
    wide = kernels.feature_swap_backward(grad_out.half().float(), index, [8, 8], 3, 1, 1, 1, reduce)[0]
    assert torch.equal(half, wide.half())


def test_feature_swap_float64():
    values = [rand(1, 2, 5, 6, seed=16, dtype=torch.float64)]
    index = torch.tensor([[[0, 5], [3, 2]]], device=DEVICE)
    out = kernels.feature_swap(values, index, 3, 1, 0, 1, 4, 4, "mean")
    assert out.dtype == torch.float64
    expected = feature_swap_ref([values[0].cpu()], index, 3, 1, 0, 1, 4, 4, "mean")
    torch.testing.assert_close(out.cpu(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_swap_half_sums_in_float32(dtype):
    """float16/bfloat16 are summed in float32 and rounded once (as on the CPU): equal to the float32
    swap rounded, even with two value maps (accumulated between launches) and 9-window sums."""
    values = [(rand(1, 3, 7, 8, seed=21 + i) * 40).to(dtype) for i in range(2)]
    g = torch.Generator().manual_seed(23)
    index = torch.randint(0, 2 * 30, (1, 5, 6), generator=g).to(DEVICE)
    for reduce in ("sum", "mean"):
        out = kernels.feature_swap(values, index, 3, 1, 0, 1, 7, 8, reduce)
        wide = kernels.feature_swap([v.float() for v in values], index, 3, 1, 0, 1, 7, 8, reduce)
        assert out.dtype == dtype
        torch.testing.assert_close(out, wide.to(dtype), atol=0, rtol=0)
        grad_out = (rand(1, 3, 7, 8, seed=24) * 40).to(dtype)
        grads = kernels.feature_swap_backward(grad_out, index, [7, 8, 7, 8], 3, 1, 0, 1, reduce)
        wide = kernels.feature_swap_backward(grad_out.float(), index, [7, 8, 7, 8], 3, 1, 0, 1, reduce)
        # NB: the interpreter truncates float32 -> bfloat16 in kernel stores (a GPU rounds to nearest).
        ulp = 2.0**-7 if INTERPRET and dtype == torch.bfloat16 else 0.0
        for got, want in zip(grads, wide, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=ulp)


def test_feature_swap_mean_is_correctly_rounded():
    """The mean divides with round-to-nearest: the float32 rounding of the float64 quotient of the
    float32 sum (an approximate division, as '/' compiles to on a GPU, is off by an ulp here and there)."""
    values = [rand(1, 4, 9, 9, seed=25) * 3 + 1]
    g = torch.Generator().manual_seed(26)
    index = torch.randint(0, 49, (1, 7, 7), generator=g).to(DEVICE)
    total = kernels.feature_swap(values, index, 3, 1, 0, 1, 9, 9, "sum")
    mean = kernels.feature_swap(values, index, 3, 1, 0, 1, 9, 9, "mean")
    count = kernels.feature_swap([torch.ones_like(values[0])], index, 3, 1, 0, 1, 9, 9, "sum")
    assert torch.equal(mean, (total.double() / count.double()).float())


def test_launch_device_is_the_tensors_device():
    """Triton launches run under a guard for the device of their first CUDA tensor."""
    module = sys.modules["srntt_core._triton.patch_match"]
    cpu = torch.zeros(1)
    assert module.launch_device([cpu, 3, "x"]) is None
    fake = torch.empty(1, device="meta")
    assert module.launch_device([fake]) is None
    if torch.cuda.device_count() > 1:
        assert module.launch_device([3, torch.zeros(1, device="cuda:1")]) == torch.device("cuda", 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_second_device():
    """Tensors on cuda:1 while cuda:0 is current: same results as on cuda:0."""
    query, keys = rand(1, 8, 9, 10, seed=27), [rand(1, 8, 8, 9, seed=28)]
    want = kernels.patch_match(query, keys, 3, 1, 1, "highest")
    with torch.cuda.device(0):
        got = kernels.patch_match(query.to("cuda:1"), [keys[0].to("cuda:1")], 3, 1, 1, "highest")
    assert torch.equal(got[0].cpu(), want[0].cpu())
    values = [rand(1, 3, 8, 9, seed=29)]
    index = want[0]
    want = kernels.feature_swap(values, index, 3, 1, 1, 1, 9, 10, "mean")
    with torch.cuda.device(0):
        got = kernels.feature_swap([values[0].to("cuda:1")], index.to("cuda:1"), 3, 1, 1, 1, 9, 10, "mean")
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.skipif(INTERPRET, reason="cuDNN TF32 is a GPU matter")
def test_patch_norms_immune_to_tf32(monkeypatch):
    """Patch norms are exact fp32 sums even with TF32 allowed everywhere (cuDNN allows it by default)."""
    module = sys.modules["srntt_core._triton.patch_match"]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x = rand(1, 256, 40, 50, seed=30) * 10
    got = module._patch_sq_norms(x, 3, 1, 0).double().cpu()
    sq = x.double().cpu().square().sum(1, keepdim=True)
    want = F.avg_pool2d(sq, 3, stride=1, divisor_override=1).flatten(1)
    assert ((got - want).abs() / want).max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# registration


def test_opcheck():
    """Schema, fake kernels and tracing of the three ops (tiny inputs)."""
    query, keys = rand(1, 2, 3, 4, seed=17), [rand(1, 2, 3, 3, seed=18)]
    torch.library.opcheck(torch.ops.srntt._patch_match_triton, (query, keys, 3, 1, 1, "highest"))
    index, _ = kernels.patch_match(query, keys, 3, 1, 1, "highest")
    values = [rand(1, 2, 6, 6, seed=19)]
    torch.library.opcheck(torch.ops.srntt._feature_swap_triton, (values, index, 3, 1, 1, 2, 6, 7, "mean"))
    grad_out = rand(1, 2, 6, 7, seed=20)
    torch.library.opcheck(
        torch.ops.srntt._feature_swap_triton_backward, (grad_out, index, [6, 6], 3, 1, 1, 2, "mean")
    )


def test_not_supported_reasons():
    assert kernels.not_supported_reasons(DEVICE) == []
    assert kernels.not_supported_reasons("meta")


def test_patch_match_exact_fp32_switch(monkeypatch):
    """SRNTT_TRITON_EXACT_FP32=1 scores float32 "highest" with exact fp32 dots only (no tensor-core
    candidates); both routes answer within the "highest" contract on the same near-tie problem."""
    import importlib

    module = importlib.import_module("srntt_core._triton.patch_match")
    key = rand(1, 6, 8, 9, seed=3)
    query = key[:, :, 1:7, 2:9] + 1e-3 * rand(1, 6, 6, 7, seed=4)
    sim = similarity_ref(query, [key], 3, 1, 1)
    for exact in (False, True):
        monkeypatch.setattr(module, "EXACT_FP32", exact)
        index, score = kernels.patch_match(query, [key], 3, 1, 1, "highest")
        check_match(index, score, sim, PRECISION_TOL["highest"])
