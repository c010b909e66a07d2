"""The CUDA kernels (csrc/cuda) called as kernel-level ops, against float64 plain-torch references.

``torch.ops.srntt._patch_match_fused`` / ``_feature_swap_fused`` / ``_feature_swap_fused_backward`` on
CUDA tensors; docs/CONTRACT.md §4 contract: indices are compared exactly only where the exact top-2 margin
exceeds the tolerance, and the chosen key's exact score must be within the tolerance of the exact
maximum everywhere. Skipped without a CUDA device. ``test_cuda_check_script`` (no GPU needed) runs
scripts/cuda_check.sh when nvcc is present.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srntt_core.ops import extension

ROOT = Path(__file__).parents[1]
EPS = 1e-12
TOLS = {"highest": 1e-5, "high": 1e-3, "medium": 2e-3}  # docs/CONTRACT.md §4

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _cuda_kernels(request):
    if request.node.get_closest_marker("cuda") is None:
        return
    for op in ("_patch_match_fused", "_feature_swap_fused", "_feature_swap_fused_backward"):
        if not extension.has_kernel(op, "CUDA"):
            pytest.fail(f"srntt::{op} has no CUDA kernel (extension built without CUDA? "
                        f"load error: {extension.LOAD_ERROR})")


def _nvcc():
    return shutil.which("nvcc") or next(
        (p for p in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc")
         if os.path.isfile(p)), None)


# ---------------------------------------------------------------------------------------------
# float64 references

def ref_similarity(query, keys, p, s, pad):
    """(B, Nq, Nk) float64 cosine similarities over the concatenated key grids (small sizes only)."""
    def unit(x):
        d = F.unfold(x.double().cpu(), p, padding=pad, stride=s)
        return d / d.norm(dim=1, keepdim=True).clamp_min(EPS)

    return torch.bmm(unit(query).transpose(1, 2), torch.cat([unit(k) for k in keys], dim=2))


def ref_feature_swap(values, index, p, s, pad, scale, out_h, out_w, reduce):
    """CONTRACT.md §3 by unfold / gather / fold on a canvas of every output window (float64, autograd)."""
    win, step, off = p * scale, s * scale, pad * scale
    b, cv = values[0].shape[:2]
    gqh, gqw = index.shape[-2:]
    # Value window of key cell (u, v) starts at (u*s - pad)*scale: unfold with padding pad*scale.
    cols = torch.cat([F.unfold(v, win, padding=off, stride=step) for v in values], dim=2)
    taken = cols.gather(2, index.reshape(b, 1, -1).expand(-1, cols.shape[1], -1))
    canvas = ((gqh - 1) * step + win, (gqw - 1) * step + win)  # output window i starts at i*step - off
    summed = F.fold(taken, canvas, win, stride=step)
    count = F.fold(torch.ones_like(taken[:1, :win * win]), canvas, win, stride=step)

    def crop(x):  # output pixel y is canvas row y + off; rows beyond the canvas are zero
        x = F.pad(x, (0, max(0, out_w + off - canvas[1]), 0, max(0, out_h + off - canvas[0])))
        return x[..., off:off + out_h, off:off + out_w]

    out, count = crop(summed), crop(count)
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp(min=1), torch.zeros_like(out))
    return out


def grid(size, p, s, pad):
    return (size + 2 * pad - p) // s + 1


def features(*shape, seed=0, dtype=torch.float32):
    """ReLU-like features (mostly non-negative, exact zeros): dense near-ties, as relu3_1 has."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).clamp_min(-0.3).to(dtype)


def check_match(query, keys, p, s, pad, precision, dtype=torch.float32):
    """Runs the CUDA op and checks the docs/CONTRACT.md §4 contract against the dense float64 similarities."""
    index, score = torch.ops.srntt._patch_match_fused(
        query.to("cuda", dtype), [k.to("cuda", dtype) for k in keys], p, s, pad, precision)
    torch.cuda.synchronize()
    tol = 1e-10 if dtype == torch.float64 else TOLS[precision]
    sim = ref_similarity(query.to(dtype), [k.to(dtype) for k in keys], p, s, pad)
    b, gh, gw = query.shape[0], grid(query.shape[2], p, s, pad), grid(query.shape[3], p, s, pad)
    assert index.shape == (b, gh, gw) and score.shape == (b, gh, gw)
    assert index.dtype == torch.int64 and score.dtype == dtype
    index, score = index.cpu().reshape(b, -1), score.cpu().reshape(b, -1)
    assert index.min() >= 0 and index.max() < sim.shape[2]
    best, best_index = sim.max(dim=2)  # first maximal index: ties to the smallest
    chosen = sim.gather(2, index.unsqueeze(2)).squeeze(2)
    shortfall = (best - chosen).max().item()
    assert shortfall <= tol, f"chosen key is {shortfall:.3g} below the max"
    if sim.shape[2] > 1:
        top2 = sim.topk(2, dim=2).values
        sure = (top2[..., 0] - top2[..., 1]) > tol
        bad = sure & (index != best_index)
        assert not bad.any(), f"{int(bad.sum())} indices differ where the top-2 margin > {tol}"
    score_tol = 1e-10 if dtype == torch.float64 else 1e-5  # the returned score is re-scored in fp32
    torch.testing.assert_close(score.double(), chosen, atol=score_tol, rtol=0)
    return index.reshape(b, gh, gw), score.reshape(b, gh, gw)


# ---------------------------------------------------------------------------------------------
# patch_match

PRECISIONS = ["highest", "high", "medium"]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("p,s,pad", [(3, 1, 0), (3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 3, 2), (2, 2, 0)])
def test_patch_match_odd_sizes_several_keys(p, s, pad, precision):
    query = features(2, 7, 13, 11, seed=1)
    keys = [features(2, 7, 9, 14, seed=2), features(2, 7, 5, 5, seed=3), features(2, 7, 17, 6, seed=4)]
    check_match(query, keys, p, s, pad, precision)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_many_tiles_and_splits(precision):
    # Several 64-query tiles, several 64-key tiles split over blocks, descriptor length 63 * 9 = 567
    # (not a multiple of the 16/32 k-steps), a key grid that ends mid-tile.
    query = features(1, 63, 41, 37, seed=5)
    keys = [features(1, 63, 50, 45, seed=6), features(1, 63, 11, 70, seed=7)]
    check_match(query, keys, 3, 1, 1, precision)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_float64_is_exact(precision):
    query = features(2, 5, 12, 9, seed=8, dtype=torch.float64)
    keys = [features(2, 5, 8, 13, seed=9, dtype=torch.float64)]
    check_match(query, keys, 3, 1, 1, precision, dtype=torch.float64)
    check_match(query, keys, 3, 2, 0, precision, dtype=torch.float64)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_ties_go_to_smallest_index(precision):
    # The key repeats the query side by side, and the key list repeats that map: every query patch
    # has exact copies (score 1) at several key positions, bit-identical in every kernel.
    query = features(1, 6, 9, 10, seed=10)
    tiled = torch.cat([query, query], dim=3)
    index, score = check_match(query, [tiled, tiled], 3, 1, 0, precision)
    gh, gw = grid(9, 3, 1, 0), grid(10, 3, 1, 0)
    gkw = grid(20, 3, 1, 0)
    expected = torch.arange(gh).view(gh, 1) * gkw + torch.arange(gw).view(1, gw)  # first copy
    assert torch.equal(index[0], expected)
    torch.testing.assert_close(score, torch.ones_like(score), atol=1e-5, rtol=0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_zero_patches(precision):
    # Zero query patches score 0 against everything: index 0. Zero key patches score 0.
    query = features(1, 4, 10, 10, seed=11)
    query[..., :5, :] = 0
    key = features(1, 4, 8, 8, seed=12)
    key[..., 4:, :] = 0
    index, score = check_match(query, [key], 3, 1, 0, precision)
    assert (index[0, :3] == 0).all() and (score[0, :3] == 0).all()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_noncontiguous_inputs(precision):
    query = features(2, 6, 11, 13, seed=13).transpose(2, 3)
    key = features(2, 6, 12, 10, seed=14)[:, :, ::2]
    assert not query.is_contiguous() and not key.is_contiguous()
    check_match(query, [key], 3, 1, 1, precision)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_memory_is_linear(precision):
    # 9801 x 9604 patches: the similarity matrix alone would take 376 MB in fp32.
    query = torch.rand(1, 32, 101, 101, device="cuda")
    key = torch.rand(1, 32, 100, 100, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 1, precision)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * 2**20, f"{extra / 2**20:.1f} MiB extra"


@pytest.mark.cuda
@requires_cuda
def test_patch_match_rejects_bad_arguments():
    q = torch.rand(1, 3, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="precision"):
        torch.ops.srntt._patch_match_fused(q, [q], 3, 1, 0, "low")
    with pytest.raises(RuntimeError, match="keys\\[0\\]"):
        torch.ops.srntt._patch_match_fused(q, [torch.rand(1, 4, 8, 8, device="cuda")], 3, 1, 0, "highest")
    with pytest.raises(RuntimeError, match="smaller than one patch"):
        torch.ops.srntt._patch_match_fused(q, [torch.rand(1, 3, 2, 8, device="cuda")], 3, 1, 0, "highest")


# ---------------------------------------------------------------------------------------------
# feature_swap

SWAP_CASES = [  # p, s, pad, scale
    (3, 1, 0, 1), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 4),
    (3, 2, 1, 2), (2, 2, 0, 3), (1, 1, 0, 2), (5, 3, 2, 1),
]


def swap_problem(p, s, pad, scale, dtype, seed=0, refs=((7, 9), (5, 6))):
    g = torch.Generator().manual_seed(seed)
    # Value maps with a leftover beyond key map * scale (odd sizes).
    values = [torch.randn(2, 5, hk * scale + scale // 2, wk * scale + (scale > 1), generator=g, dtype=dtype)
              for hk, wk in refs]
    nk = sum(grid(v.shape[2] // scale, p, s, pad) * grid(v.shape[3] // scale, p, s, pad) for v in values)
    gqh, gqw = grid(11, p, s, pad), grid(8, p, s, pad)
    index = torch.randint(0, nk, (2, gqh, gqw), generator=g)
    index[0, 0, :] = index[0, 0, 0]  # several query cells on one key cell
    return values, index


def default_out(index, p, s, pad, scale):
    gqh, gqw = index.shape[-2:]
    return ((gqh - 1) * s + p - 2 * pad) * scale, ((gqw - 1) * s + p - 2 * pad) * scale


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,s,pad,scale", SWAP_CASES)
def test_feature_swap_forward_backward(p, s, pad, scale, dtype, reduce):
    values, index = swap_problem(p, s, pad, scale, dtype)
    oh, ow = default_out(index, p, s, pad, scale)
    for out_h, out_w in ((oh, ow), (oh + 3, max(1, ow - 2))):  # default size and an override
        v64 = [v.double().requires_grad_() for v in values]
        expected = ref_feature_swap(v64, index, p, s, pad, scale, out_h, out_w, reduce)
        out = torch.ops.srntt._feature_swap_fused([v.cuda() for v in values], index.cuda(), p, s, pad, scale,
                                                  out_h, out_w, reduce)
        assert out.dtype == dtype and out.shape == expected.shape
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.cpu().double(), expected.detach(), atol=tol, rtol=tol)

        grad_out = torch.randn(expected.shape, dtype=torch.float64)
        expected_grads = torch.autograd.grad(expected, v64, grad_out)
        sizes = [n for v in values for n in v.shape[2:]]
        args = (grad_out.to("cuda", dtype), index.cuda(), sizes, p, s, pad, scale, reduce)
        grads = torch.ops.srntt._feature_swap_fused_backward(*args)
        assert len(grads) == len(values)
        for got, want in zip(grads, expected_grads, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)
        again = torch.ops.srntt._feature_swap_fused_backward(*args)
        deterministic = all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))
        assert deterministic, "backward is not deterministic"


@pytest.mark.cuda
@requires_cuda
def test_feature_swap_many_references():
    # More references than one launch takes (kSwapRefsPerLaunch = 8): chunked accumulation.
    p, s, pad, scale = 3, 1, 1, 2
    refs = [(4 + r % 3, 5) for r in range(11)]
    values, index = swap_problem(p, s, pad, scale, torch.float64, seed=3, refs=refs)
    oh, ow = default_out(index, p, s, pad, scale)
    for reduce in ("mean", "sum"):
        expected = ref_feature_swap(values, index, p, s, pad, scale, oh, ow, reduce)
        out = torch.ops.srntt._feature_swap_fused([v.cuda() for v in values], index.cuda(), p, s, pad, scale,
                                                  oh, ow, reduce)
        torch.testing.assert_close(out.cpu(), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.cuda
@requires_cuda
def test_feature_swap_backward_one_hot_key():
    # Every query cell matched to one key cell: one bucket holds all of them.
    values = [torch.randn(1, 3, 20, 20, dtype=torch.float64)]
    index = torch.full((1, 18, 18), 37, dtype=torch.int64)
    v64 = [values[0].clone().requires_grad_()]
    expected = ref_feature_swap(v64, index, 3, 1, 0, 1, 20, 20, "mean")
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    (want,) = torch.autograd.grad(expected, v64, grad_out)
    (got,) = torch.ops.srntt._feature_swap_fused_backward(grad_out.cuda(), index.cuda(), [20, 20], 3, 1, 0, 1,
                                                          "mean")
    torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# the compile check of the kernel headers (no GPU needed)

@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_check_script():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "cuda_check.sh")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cuda_check: OK" in result.stdout


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_swap_float16_bfloat16_upcast(dtype):
    # As on the CPU: swapped in float32, rounded once to the input dtype.
    p, s, pad, scale = 3, 1, 1, 2
    values, index = swap_problem(p, s, pad, scale, torch.float32, seed=5)
    values = [v.to(dtype) for v in values]
    oh, ow = default_out(index, p, s, pad, scale)
    for reduce in ("mean", "sum"):
        want = ref_feature_swap([v.double() for v in values], index, p, s, pad, scale, oh, ow, reduce)
        want = want.to(dtype)
        out = torch.ops.srntt._feature_swap_fused([v.cuda() for v in values], index.cuda(), p, s, pad, scale,
                                                  oh, ow, reduce)
        assert out.dtype == dtype
        torch.testing.assert_close(out.cpu(), want, atol=0, rtol=0)
        grad_out = torch.randn(want.shape).to(dtype)
        sizes = [n for v in values for n in v.shape[2:]]
        grads = torch.ops.srntt._feature_swap_fused_backward(grad_out.cuda(), index.cuda(), sizes, p, s, pad,
                                                             scale, reduce)
        wide = torch.ops.srntt._feature_swap_fused_backward(grad_out.float().cuda(), index.cuda(), sizes, p,
                                                            s, pad, scale, reduce)
        for got, ref in zip(grads, wide, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got, ref.to(dtype), atol=0, rtol=0)


@pytest.mark.cuda
@requires_cuda
def test_feature_swap_mean_divides_correctly_rounded():
    # 3 windows cover a pixel along each axis: the mean divides by 9. A correctly rounded float32
    # division gives the float32 rounding of the float64 quotient of the (exact) float32 sum.
    g = torch.Generator().manual_seed(7)
    values = [torch.rand(1, 8, 12, 12, generator=g) * 3 + 1]
    index = torch.randint(0, 100, (1, 10, 10), generator=g)
    total = torch.ops.srntt._feature_swap_fused([values[0].cuda()], index.cuda(), 3, 1, 0, 1, 12, 12, "sum")
    mean = torch.ops.srntt._feature_swap_fused([values[0].cuda()], index.cuda(), 3, 1, 0, 1, 12, 12, "mean")
    count = torch.ops.srntt._feature_swap_fused([torch.ones_like(values[0]).cuda()], index.cuda(), 3, 1, 0, 1,
                                                12, 12, "sum")
    want = (total.double() / count.double()).float()
    assert torch.equal(mean, want), f"{int((mean != want).sum())} pixels not correctly rounded"


def _torch_check_messages(text: str):
    """The message arguments (everything after the condition) of every TORCH_CHECK in C++ source."""
    for m in re.finditer(r"\bTORCH_CHECK\s*\(", text):
        depth, arg, args, i = 1, "", [], m.end()
        while depth and i < len(text):
            ch = text[i]
            if ch == '"':  # a string literal: brackets and commas inside it do not count
                end = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i).end()
                arg += text[i:end]
                i = end
                continue
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 1:
                args.append(arg)
                arg = ""
            elif depth:
                arg += ch
            i += 1
        args.append(arg)
        yield m.start(), args[1:]


def test_cuda_bindings_stream_no_unsigned_into_torch_check():
    # Streaming a size_t into TORCH_CHECK from nvcc-compiled host code crashes (SIGSEGV inside
    # std::ostream on torch 2.11 + CUDA 13.0, seen on an H200): messages take signed integers only.
    offenders = []
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = path.read_text()
        unsigned = set(re.findall(r"\b(?:size_t|unsigned(?: long| int)?|uint\d+_t)\s+(\w+)\s*[=;:)]", text))
        for pos, message in _torch_check_messages(text):
            for arg in message:
                expr = arg.strip()
                if (any(re.fullmatch(rf"{v}(\s*[-+*/%]\s*\w+)*", expr) for v in unsigned)
                        or re.search(r"\.size\(\)$", expr)):
                    offenders.append(f"{path.name}:{text.count(chr(10), 0, pos) + 1}: {expr}")
    assert not offenders, "unsigned values streamed into TORCH_CHECK: " + "; ".join(offenders)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_swap_mean_division_is_round_to_nearest_in_ptx(tmp_path):
    # Under --use_fast_math a float '/' compiles to div.approx(.ftz).f32; the swap kernels must not.
    src = tmp_path / "swap.cu"
    src.write_text('#include "cuda/feature_swap.cuh"\n'
                   "namespace srntt { namespace cuda_kernels {\n"
                   "template __global__ void feature_swap_forward_kernel<float>(SwapRefs<float>,"
                   " const int64_t*, float*, SwapGeom, bool, bool);\n"
                   "template __global__ void feature_swap_backward_kernel<float>(const float*, const int*,"
                   " const int*, SwapValueMap, SwapGeom, float*);\n"
                   "}}\n")
    ptx = tmp_path / "swap.ptx"
    result = subprocess.run([_nvcc(), "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                             f"-I{ROOT / 'csrc'}", "-ptx", "-arch=compute_80", str(src), "-o", str(ptx)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    # NB: --use_fast_math also flushes denormals (div.rn.ftz.f32), as the rest of the extension does.
    assert re.search(r"div\.rn(\.ftz)?\.f32", text)
    assert not re.search(r"div\.(approx|full)", text)


def test_auto_falls_back_without_a_kernel_image(monkeypatch):
    # An extension built for other archs (e.g. sm_80/sm_90 cubins on an sm_120 GPU) has no kernel
    # image there: `auto` must take the next backend instead of failing with "no kernel image".
    from srntt_core.ops import dispatch

    # The backend asks the kernel registry once, when it is built: pretend that said yes.
    monkeypatch.setattr(dispatch.get("cuda"), "has_kernels", True)
    monkeypatch.setattr(extension, "LOADED", True)
    monkeypatch.setattr(extension, "cuda_kernel_image", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(dispatch.get("triton"), "not_supported_reasons", lambda device: ["no triton here"])
    device = torch.device("cuda", 0)
    reasons = dispatch.get("cuda").not_supported_reasons(device)
    assert any("no kernel image for compute capability 12.0" in r for r in reasons), reasons
    assert dispatch.resolve("auto", device) == "torch"
    monkeypatch.setattr(extension, "cuda_kernel_image", lambda index: 90)
    assert dispatch.resolve("auto", device) == "cuda"


@pytest.mark.cuda
@requires_cuda
def test_cuda_kernel_image_of_this_gpu():
    major, minor = torch.cuda.get_device_capability(0)
    image = extension.cuda_kernel_image(0)
    # A cubin of the same major version, or PTX compiled for this GPU at load time.
    assert image and image // 10 <= major, (image, major, minor)


def test_torch_backend_scores_in_ieee_fp32_whatever_the_global_setting(monkeypatch):
    # A global allow_tf32 / float32_matmul_precision("high"|"medium") must not reach the torch
    # backend's score GEMM (TF32 inputs put most scores > 1e-5 off on a GPU).
    from srntt_core.ops import torch_backend

    seen = []
    bmm = torch.bmm

    def spy(*args):
        seen.append(torch.get_float32_matmul_precision())
        return bmm(*args)

    monkeypatch.setattr(torch, "bmm", spy)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        query, key = torch.rand(1, 4, 7, 8), torch.rand(1, 4, 6, 9)
        torch_backend.patch_match(query, [key], 3, 1, 0)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.cuda
@requires_cuda
def test_torch_backend_exact_with_tf32_allowed(monkeypatch):
    from srntt_core.ops import torch_backend

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    g = torch.Generator().manual_seed(9)
    query, key = torch.rand(1, 64, 20, 24, generator=g), torch.rand(1, 64, 18, 22, generator=g)
    _, score = torch_backend.patch_match(query.cuda(), [key.cuda()], 3, 1, 0)
    _, exact = torch_backend.patch_match(query.double(), [key.double()], 3, 1, 0)
    assert (score.cpu().double() - exact).abs().max().item() <= 1e-5
