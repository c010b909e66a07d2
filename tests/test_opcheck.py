"""torch.library.opcheck on the public custom ops (per backend) and on the C++ kernel-level ops;
the public ops also trace under torch.compile (fake kernels)."""

import pytest
import torch
from conftest import features, random_index

from srntt_core.ops import extension  # noqa: F401  (registers srntt::patch_match, ...)


def _patch_match_samples(device):
    q32 = features(2, 3, 7, 9, seed=1, device=device).requires_grad_()
    k32 = [features(2, 3, 6, 5, seed=2, device=device).requires_grad_(),
           features(2, 3, 4, 8, seed=3, device=device).requires_grad_()]
    q64 = features(1, 4, 8, 6, seed=4, dtype=torch.float64, device=device).requires_grad_()
    k64 = [features(1, 4, 9, 7, seed=5, dtype=torch.float64, device=device).requires_grad_()]
    return [
        (q32, k32, 3, 1, 0),
        (q64, k64, 3, 2, 1),
        (q32.detach(), [k.detach() for k in k32], 1, 1, 0),
    ]


def _feature_swap_samples(device):
    v = [features(2, 3, 12, 10, seed=6, device=device).requires_grad_(),
         features(2, 3, 8, 14, seed=7, device=device).requires_grad_()]
    v64 = [features(1, 2, 10, 9, seed=8, dtype=torch.float64, device=device).requires_grad_()]
    return [
        # values, index, patch_size, stride, padding, scale, out_h, out_w, reduce
        (v, random_index(v, (5, 6), 3, 1, 1, 2, seed=1), 3, 1, 1, 2, 10, 12, "mean"),
        (v, random_index(v, (3, 4), 3, 2, 0, 2, seed=2), 3, 2, 0, 2, 14, 18, "sum"),
        (v64, random_index(v64, (4, 3), 3, 1, 0, 1, seed=3), 3, 1, 0, 1, 7, 5, "mean"),
    ]


# NB: opcheck's test_aot_dispatch_dynamic traces the backward symbolically, ~10 s per call with inputs
# that require grad. The score's autograd formula is the op's, shared by every backend, so it is
# traced once (test_opcheck_patch_match_autograd); per backend the other checks see every sample.
CHEAP = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_patch_match(backend):
    for query, keys, patch_size, stride, padding in _patch_match_samples(backend.device):
        args = (query, keys, patch_size, stride, padding, backend.name, "highest")
        torch.library.opcheck(torch.ops.srntt.patch_match.default, args, test_utils=CHEAP)
        args = (query.detach(), [k.detach() for k in keys], *args[2:])
        torch.library.opcheck(torch.ops.srntt.patch_match.default, args)


def test_opcheck_patch_match_autograd():
    query = features(1, 2, 5, 6, seed=1).requires_grad_()
    keys = [features(1, 2, 5, 5, seed=2).requires_grad_(), features(1, 2, 4, 4, seed=3).requires_grad_()]
    torch.library.opcheck(torch.ops.srntt.patch_match.default, (query, keys, 3, 1, 1, "torch", "highest"))


def test_opcheck_feature_swap(backend):
    for args in _feature_swap_samples(backend.device):
        torch.library.opcheck(torch.ops.srntt.feature_swap.default, (*args, backend.name))


def test_opcheck_feature_swap_backward(backend):
    for values, index, patch_size, stride, padding, scale, out_h, out_w, reduce in _feature_swap_samples(
            backend.device):
        grad = features(values[0].shape[0], values[0].shape[1], out_h, out_w, seed=9, dtype=values[0].dtype,
                        device=backend.device)
        sizes = [s for v in values for s in v.shape[-2:]]
        torch.library.opcheck(torch.ops.srntt.feature_swap_backward.default,
                              (grad, index, sizes, patch_size, stride, padding, scale, reduce, backend.name))


needs_ext = pytest.mark.skipif(not extension.LOADED,
                               reason=f"srntt_core._C not loaded: {extension.LOAD_ERROR}")


@needs_ext
def test_opcheck_kernel_patch_match_fused():
    samples = _patch_match_samples("cpu")
    for (query, keys, patch_size, stride, padding), precision in zip(samples, ("highest", "medium", "high"),
                                                                      strict=True):
        torch.library.opcheck(torch.ops.srntt._patch_match_fused.default,
                              (query.detach(), [k.detach() for k in keys], patch_size, stride, padding,
                               precision))


@needs_ext
def test_opcheck_kernel_feature_swap_fused():
    for values, *rest in _feature_swap_samples("cpu"):
        torch.library.opcheck(torch.ops.srntt._feature_swap_fused.default,
                              ([v.detach() for v in values], *rest))


@needs_ext
def test_opcheck_kernel_feature_swap_fused_backward():
    for values, index, patch_size, stride, padding, scale, out_h, out_w, reduce in _feature_swap_samples(
            "cpu"):
        grad = features(*values[0].shape[:2], out_h, out_w, seed=9, dtype=values[0].dtype)
        sizes = [s for v in values for s in v.shape[-2:]]
        torch.library.opcheck(torch.ops.srntt._feature_swap_fused_backward.default,
                              (grad, index, sizes, patch_size, stride, padding, scale, reduce))


def test_ops_compile_fullgraph(backend):
    """The public ops trace without graph breaks (fake kernels) and give the eager results."""
    dev = backend.device
    query = features(1, 4, 9, 8, seed=1, device=dev)
    keys = [features(1, 4, 7, 9, seed=2, device=dev), features(1, 4, 5, 5, seed=3, device=dev)]
    values = [features(1, 2, 14, 18, seed=4, device=dev), features(1, 2, 10, 10, seed=5, device=dev)]

    def swap(query, keys, values):
        score, index = torch.ops.srntt.patch_match(query, keys, 3, 1, 1, backend.name, "highest")
        out = torch.ops.srntt.feature_swap(values, index, 3, 1, 1, 2, 18, 16, "mean", backend.name)
        return out * score.mean()

    torch._dynamo.reset()
    compiled = torch.compile(swap, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(query, keys, values), swap(query, keys, values), atol=0, rtol=0)


def test_public_api_compiles_fullgraph(backend):
    """sw.patch_match then sw.feature_swap compile without graph breaks: the data checks (NaN/Inf,
    index range) run inside the ops, and still raise in the compiled function."""
    import srntt_core.swap as sw

    dev = backend.device
    query, key = features(1, 4, 9, 8, seed=1, device=dev), features(1, 4, 7, 9, seed=2, device=dev)
    values = features(1, 2, 14, 18, seed=4, device=dev)

    def swap(query, key, values):
        m = sw.patch_match(query, key, padding=1, backend=backend.name)
        out = sw.feature_swap(values, m.index, padding=1, scale=2, out_size=(18, 16), backend=backend.name)
        return out * m.score.mean()

    torch._dynamo.reset()
    compiled = torch.compile(swap, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(query, key, values), swap(query, key, values), atol=0, rtol=0)
    bad = query.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="query: contains NaN or Inf"):
        compiled(bad, key, values)


def test_first_call_does_not_import_dynamo():
    """The public ops are registered without torch._disable_dynamo wrappers, so a first swap does
    not pay torch._dynamo's import (seconds) — the CLI and first calls stay fast."""
    import subprocess
    import sys

    code = (
        "import sys, torch, srntt_core.swap as sw\n"
        "q = torch.rand(1, 4, 6, 6, requires_grad=True)\n"
        "m = sw.patch_match(q, q.detach(), backend='torch')\n"
        "sw.feature_swap(q, m.index, backend='torch').sum().backward()\n"
        "m.score.sum().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
