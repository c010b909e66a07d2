"""The CUDA kernels (csrc/cuda) beyond what every backend is checked for in tests/test_conformance.py:
O(N) memory, the bindings' own argument checks, the kernel image of this GPU, compile checks of
the sources (``test_cuda_check_script`` runs scripts/cuda_check.sh when nvcc is present, no GPU
needed), and the ``torch`` backend's fp32 scoring on a GPU. Skipped without a CUDA device.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import peak_memory
import pytest
import torch

from srntt_core.ops import extension

ROOT = Path(__file__).parents[1]

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
# patch_match

PRECISIONS = ["highest", "high", "medium"]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_match_memory_is_linear(precision):
    # 9801 x 9604 patches: the similarity matrix alone would take 376 MB in fp32.
    query = torch.rand(1, 32, 101, 101, device="cuda")
    key = torch.rand(1, 32, 100, 100, device="cuda")
    match = torch.ops.srntt._patch_match_fused
    extra = peak_memory.peak_bytes(lambda: match(query, [key], 3, 1, 1, precision), "cuda")
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
# the compile check of the kernel headers (no GPU needed)

@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_check_script():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "cuda_check.sh")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cuda_check: OK" in result.stdout


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
                   " const int*, SwapChunks<float>, SwapValueMap, SwapGeom, float*);\n"
                   "template __global__ void feature_swap_chunk_kernel<float>(const float*, const int*,"
                   " const unsigned long long*, const int*, int64_t, int64_t, int64_t, SwapChunks<float>,"
                   " SwapGeom);\n"
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
