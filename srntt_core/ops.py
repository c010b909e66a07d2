"""The public custom ops ``srntt::patch_match``, ``srntt::feature_swap`` and
``srntt::feature_swap_backward``: schemas, fake kernels and autograd, declared once.

Each op takes a concrete ``backend`` name (resolved by :mod:`srntt_core.dispatch`) and routes to
that backend's kernel; validation happens in :mod:`srntt_core.swap` before the op is called.
Fake kernels for the C++ kernel-level ops (``srntt::_*_fused``) are registered here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext, dispatch, reference


def _grid(t: Tensor, patch_size: int, stride: int, padding: int) -> tuple[int, int]:
    return (reference.grid_size(t.shape[-2], patch_size, stride, padding),
            reference.grid_size(t.shape[-1], patch_size, stride, padding))


def _patch_match_fake(query, keys, patch_size, stride, padding, *rest):
    gh, gw = _grid(query, patch_size, stride, padding)
    shape = (query.shape[0], gh, gw)
    return (query.new_empty(shape, dtype=torch.long),
            query.new_empty(shape, dtype=reference.score_dtype(query.dtype)))


def _patch_match_op_fake(*args):
    index, score = _patch_match_fake(*args)
    return score, index


def _feature_swap_fake(values, index, patch_size, stride, padding, scale, out_h, out_w, *rest):
    return values[0].new_empty((values[0].shape[0], values[0].shape[1], out_h, out_w))


def _feature_swap_backward_fake(grad, index, value_sizes, *rest):
    b, c = grad.shape[:2]
    return [grad.new_empty((b, c, value_sizes[2 * i], value_sizes[2 * i + 1]))
            for i in range(len(value_sizes) // 2)]


# NB: declared with torch.library.define/impl rather than @torch.library.custom_op: custom_op wraps
# every kernel in torch._disable_dynamo, whose first call imports torch._dynamo (3-11 s here), a
# cost every CLI run and every first swap would pay. The low-level API registers the same schema,
# fake kernel and autograd formula without it; opcheck covers the registrations (tests/test_opcheck.py).
torch.library.define(
    "srntt::patch_match",
    "(Tensor query, Tensor[] keys, int patch_size, int stride, int padding, str backend, str precision)"
    " -> (Tensor, Tensor)",
)


@torch.library.impl("srntt::patch_match", "CompositeExplicitAutograd")
def _patch_match_impl(query: Tensor, keys: list[Tensor], patch_size: int, stride: int, padding: int,
                      backend: str, precision: str) -> tuple[Tensor, Tensor]:
    """Cosine score and index (over the concatenated key grids) of the best key patch per query patch.

    NB: the op returns (score, index), score first: opcheck's autograd harness sums the outputs
    starting from the first, which fails on an int64 first output. The public API reorders.
    """
    index, score = dispatch.get(backend).patch_match(query, keys, patch_size, stride, padding, precision)
    return score, index


torch.library.register_fake("srntt::patch_match")(_patch_match_op_fake)
patch_match = torch.ops.srntt.patch_match.default


def _patch_match_setup(ctx, inputs, output):
    query, keys, patch_size, stride, padding, _, _ = inputs
    ctx.geometry = (patch_size, stride, padding)
    ctx.n_keys = len(keys)
    ctx.save_for_backward(query, output[1], *keys)


def _patch_match_backward(ctx, grad_score, grad_index):
    query, index, *keys = ctx.saved_tensors
    grad_query, grad_keys = reference.patch_match_score_backward(
        grad_score, query, keys, index, *ctx.geometry)
    return grad_query, grad_keys, None, None, None, None, None


torch.library.register_autograd("srntt::patch_match", _patch_match_backward, setup_context=_patch_match_setup)


torch.library.define(
    "srntt::feature_swap",
    "(Tensor[] values, Tensor index, int patch_size, int stride, int padding, int scale, int out_h,"
    " int out_w, str reduce, str backend) -> Tensor",
)


@torch.library.impl("srntt::feature_swap", "CompositeExplicitAutograd")
def _feature_swap_impl(values: list[Tensor], index: Tensor, patch_size: int, stride: int, padding: int,
                       scale: int, out_h: int, out_w: int, reduce: str, backend: str) -> Tensor:
    """Swap ``values`` windows into the query layout along ``index`` (docs/CONTRACT.md §3)."""
    return dispatch.get(backend).feature_swap(values, index, patch_size, stride, padding, scale,
                                              out_h, out_w, reduce)


torch.library.register_fake("srntt::feature_swap")(_feature_swap_fake)
feature_swap = torch.ops.srntt.feature_swap.default

torch.library.define(
    "srntt::feature_swap_backward",
    "(Tensor grad_out, Tensor index, int[] value_sizes, int patch_size, int stride, int padding,"
    " int scale, str reduce, str backend) -> Tensor[]",
)


@torch.library.impl("srntt::feature_swap_backward", "CompositeExplicitAutograd")
def _feature_swap_backward_impl(grad_out: Tensor, index: Tensor, value_sizes: list[int], patch_size: int,
                                stride: int, padding: int, scale: int, reduce: str,
                                backend: str) -> list[Tensor]:
    """Gradient of :func:`feature_swap` with respect to each values tensor; deterministic."""
    return dispatch.get(backend).feature_swap_backward(grad_out.contiguous(), index, value_sizes, patch_size,
                                                       stride, padding, scale, reduce)


torch.library.register_fake("srntt::feature_swap_backward")(_feature_swap_backward_fake)
feature_swap_backward = torch.ops.srntt.feature_swap_backward.default


def _feature_swap_setup(ctx, inputs, output):
    values, index, patch_size, stride, padding, scale, _, _, reduce, backend = inputs
    sizes = [s for v in values for s in v.shape[-2:]]
    ctx.args = (sizes, patch_size, stride, padding, scale, reduce, backend)
    ctx.save_for_backward(index)


def _feature_swap_backward_rule(ctx, grad_out):
    (index,) = ctx.saved_tensors
    value_sizes, patch_size, stride, padding, scale, reduce, backend = ctx.args
    grads = feature_swap_backward(grad_out, index, value_sizes, patch_size, stride, padding, scale,
                                  reduce, backend)
    return grads, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("srntt::feature_swap", _feature_swap_backward_rule,
                                setup_context=_feature_swap_setup)


if _ext.LOADED:
    for _name, _fake in (("_patch_match_fused", _patch_match_fake),
                         ("_feature_swap_fused", _feature_swap_fake),
                         ("_feature_swap_fused_backward", _feature_swap_backward_fake)):
        torch.library.register_fake(f"srntt::{_name}")(_fake)
