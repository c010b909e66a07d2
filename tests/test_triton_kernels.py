"""The Triton kernels (kernels/, ops srntt::_*_triton) beyond what every backend is checked for in
tests/test_conformance.py: launch devices, TF32 immunity of the norms, registration (opcheck), the
exact-fp32 switch.

They run on a CUDA device when there is one, otherwise on the CPU under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest before anything imports `srntt_core._triton`). The interpreter is slow,
so every shape here is tiny.
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

import oracle  # noqa: E402

from srntt_core import _triton as kernels  # noqa: E402

if not kernels.AVAILABLE:
    pytest.skip(kernels.UNAVAILABLE_REASON, allow_module_level=True)

# NB: with TRITON_INTERPRET=1 the kernels run on host memory, so the tensors stay on the CPU.
DEVICE = "cpu" if INTERPRET else "cuda"
def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).clamp_min(-0.3).to(dtype).to(DEVICE)


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
    exact_match = oracle.exact_match(query, [key], 3, 1, 1)
    for exact in (False, True):
        monkeypatch.setattr(module, "EXACT_FP32", exact)
        result = kernels.patch_match(query, [key], 3, 1, 1, "highest")
        oracle.assert_match(result, exact_match, oracle.TOL, score_tol=oracle.TOL)
