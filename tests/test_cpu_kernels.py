"""The C++ CPU kernels (torch.ops.srntt._*_fused on CPU tensors): what only they have.

Their answers against the float64 oracle are checked with every other backend's in
tests/test_conformance.py; here: results that do not depend on the number of threads (nor on how
the work is split between them), precision ignored, the kernels' own argument checks.
"""

import oracle
import pytest
import torch
from conftest import features, random_index

from srntt_core.ops import extension

pytestmark = pytest.mark.skipif(not extension.has_kernel("_patch_match_fused", "CPU"),
                                reason=f"srntt_core._C has no CPU kernels ({extension.LOAD_ERROR})")


def _threads(fn, counts):
    """fn() run with each number of threads in ``counts``."""
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in counts:
            torch.set_num_threads(n)
            runs.append(fn())
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_patch_match_deterministic_across_threads(dtype, stride):
    query = features(2, 32, 21, 18, dtype=dtype, seed=8)
    keys = [features(2, 32, 19, 23, dtype=dtype, seed=9), features(2, 32, 8, 30, dtype=dtype, seed=10)]
    results = _threads(lambda: torch.ops.srntt._patch_match_fused(query, keys, 3, stride, 1, "highest"),
                       (1, 2, 3))
    for index, score in results[1:]:
        assert torch.equal(index, results[0][0])
        assert torch.equal(score, results[0][1])


@pytest.mark.parametrize("batch", [1, 3])
def test_patch_match_chunking_does_not_change_results(batch):
    # The stride-1 path splits query rows by thread count and batch; results must not move.
    query = features(batch, 16, 25, 13, seed=16)
    key = features(batch, 16, 11, 20, seed=17)
    runs = _threads(lambda: torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 0, "highest"), (1, 2, 5))
    for index, score in runs[1:]:
        assert torch.equal(index, runs[0][0]) and torch.equal(score, runs[0][1])
    oracle.assert_match(runs[0], oracle.exact_match(query, [key], 3, 1, 0))


def test_patch_match_precision_is_ignored_on_cpu():
    query = features(1, 8, 9, 9, seed=11)
    key = features(1, 8, 10, 8, seed=12)
    out = [
        torch.ops.srntt._patch_match_fused(query, [key], 3, 1, 0, p) for p in ("highest", "high", "medium")
    ]
    for index, score in out[1:]:
        assert torch.equal(index, out[0][0]) and torch.equal(score, out[0][1])


def test_feature_swap_backward_deterministic_across_threads():
    values = [features(2, 4, 22, 18, seed=3, dtype=torch.float64),
              features(2, 4, 14, 26, seed=4, dtype=torch.float64)]
    index = random_index(values, (11, 10), padding=1, scale=2, seed=3)
    sizes = [n for v in values for n in v.shape[2:]]
    grad_out = features(2, 4, 22, 20, seed=5, dtype=torch.float64)
    for reduce in ("sum", "mean"):
        runs = _threads(lambda r=reduce: torch.ops.srntt._feature_swap_fused_backward(
            grad_out, index, sizes, 3, 1, 1, 2, r), (1, 2, 3))
        for grads in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(grads, runs[0], strict=True))


def test_feature_swap_rejects_bad_index():
    values = [features(1, 2, 6, 5, seed=1)]
    index = random_index(values, (4, 5))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.srntt._feature_swap_fused(values, index + 1000, 3, 1, 0, 1, 6, 7, "sum")
    with pytest.raises(RuntimeError, match="reduce"):
        torch.ops.srntt._feature_swap_fused(values, index, 3, 1, 0, 1, 6, 7, "max")
