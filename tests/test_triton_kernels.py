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
from test_flat_images import DECIDABLE, flat_features  # noqa: E402, F401 (a fixture)

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


def _scan_args(gq: int, gk: int) -> tuple:
    """Arguments of the scan kernel for gq query and gk key patches (tiny buffers: not launched)."""
    t = [torch.zeros(4, device=DEVICE) for _ in range(13)]
    return (*t, 8, gq, 100, gk, 100, 0, 800, 0, 800, 1, 0)


def test_autotune_runs_once_per_mode_on_a_capped_problem(monkeypatch):
    """At >= 2^24 pairs the scan is tuned once per mode and dtype, on at most _TUNE_QUERIES x
    _TUNE_KEYS patches of batch item 0, on copies of the state it writes."""
    module = sys.modules["srntt_core._triton.patch_match"]
    launches = []
    monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, **meta: launches.append((kernel, grid, a)))
    monkeypatch.setattr(module, "_TUNED", set())
    args = _scan_args(1 << 20, 1 << 16)
    meta = dict(P=3, COLLECT=False, PRUNE=False, TOPK=0)
    module._tune_capped(args, meta)
    module._tune_capped(_scan_args(1 << 21, 1 << 17), meta)  # the same mode again: no timing
    assert len(launches) == 1
    kernel, grid, tuned = launches[0]
    assert kernel is module._patch_match_scan_tuned
    assert tuned[14] == module._TUNE_QUERIES < args[14] and tuned[16] == module._TUNE_KEYS < args[16]
    assert grid({"BLOCK_M": 64}) == (module._TUNE_QUERIES // 64, 1)
    written = (6, 7, 9, 10)  # best_val, best_idx, count, cand
    assert all(tuned[i] is not args[i] and torch.equal(tuned[i], args[i]) for i in written)
    assert all(tuned[i] is args[i] for i in range(13) if i not in written)
    module._tune_capped(_scan_args(100, 200), dict(meta, COLLECT=True))  # another mode, small sizes kept
    assert len(launches) == 2 and launches[1][2][14] == 100 and launches[1][2][16] == 200


@pytest.mark.skipif(INTERPRET, reason="the autotuner runs on a GPU only")
def test_autotuned_scan_gives_the_fixed_config_answer(monkeypatch):
    """A problem of >= 2^24 pairs goes through the autotuned scan (tuned on a capped sub-problem):
    the same indices and scores as the fixed configuration."""
    module = sys.modules["srntt_core._triton.patch_match"]
    query, key = rand(1, 16, 66, 66, seed=32), rand(1, 16, 66, 66, seed=33)
    assert (66 * 66) ** 2 >= module._AUTOTUNE_MIN_PAIRS
    tuned = kernels.patch_match(query, [key], 3, 1, 1, "highest")
    assert module._TUNED
    monkeypatch.setattr(module, "_AUTOTUNE_MIN_PAIRS", 1 << 62)
    fixed = kernels.patch_match(query, [key], 3, 1, 1, "highest")
    assert torch.equal(tuned[0], fixed[0]) and torch.equal(tuned[1], fixed[1])


def test_patch_match_flat_image_true_maximum(flat_features):  # noqa: F811 (the fixture)
    """Flat regions of a real slide (ppt3 crops, relu3_1): keys within the float32 noise of the
    best are re-scored in float64, so every cell whose exact top-2 margin is decidable gets the
    true maximum (as the float64 oracle), and the rest stay within float64 rounding of it."""
    query, key = (x[:, :, 10:22, :16].to(DEVICE) for x in flat_features)  # 43 runner-ups within 1e-5
    index, score = kernels.patch_match(query, [key], 3, 1, 1, "highest")
    sim = oracle.dense_similarity(query, [key], 3, 1, 1)[0]
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
    sim = oracle.dense_similarity(query, keys, 3, 1, 1)
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
    want_i, want_v = topk_ref(oracle.dense_similarity(q64, k64, 3, 1, 1), 4)
    assert score.dtype == torch.float64 and torch.equal(index.cpu().flatten(1, 2), want_i)
    torch.testing.assert_close(score.cpu().flatten(1, 2), want_v[..., :4], atol=1e-12, rtol=0)
    for bad in (0, 65, 5 * 8 + 1):
        with pytest.raises(ValueError, match="k"):
            kernels.patch_match_topk(q64, k64, 3, 1, 1, "highest", bad)


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
    (want,) = oracle.feature_swap_grads([torch.zeros(1, 3, 8, 8)], index.cpu(), grad_out, 3, 1, 1, 1, (9, 7),
                                        reduce)
    torch.testing.assert_close(grads[0].cpu().double(), want, atol=1e-5, rtol=1e-5)
    again = kernels.feature_swap_backward(grad_out, index, [8, 8], 3, 1, 1, 1, reduce)
    assert torch.equal(again[0], grads[0])
    half = kernels.feature_swap_backward(grad_out.half(), index, [8, 8], 3, 1, 1, 1, reduce)[0]
    wide = kernels.feature_swap_backward(grad_out.half().float(), index, [8, 8], 3, 1, 1, 1, reduce)[0]
    assert torch.equal(half, wide.half())
