"""The public custom ops ``srntt::patch_match``, ``srntt::feature_swap`` and
``srntt::feature_swap_backward``: schemas, fake kernels and autograd, declared once.

Each op takes a concrete ``backend`` name (resolved by :mod:`srntt_core.ops.dispatch`) and routes to
that backend's kernel. :mod:`srntt_core.swap` validates its arguments with the names users know;
the ops are public too (``torch.ops.srntt.*``), so each checks its integer arguments against the
bounds of :mod:`srntt_core.ops.geometry` (in its fake kernel too, so that a compiled call fails the
same way) and its data (NaN/Inf keys and query, index range) in the real kernel, where the
values exist: the public functions then compile with ``fullgraph=True``.
Fake kernels for the C++ kernel-level ops (``srntt::_*_fused``) are registered here too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch, extension, geometry, torch_backend

PRECISIONS = ("highest", "high", "medium")
REDUCTIONS = ("mean", "sum")


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _check_rank(name: str, t: Tensor, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(t.shape)}")


def check_finite(names, tensors) -> None:
    # NB: NaN/Inf is an error for matching: a NaN descriptor compares false against every
    # running maximum, so the argmax would silently depend on the kernel's loop order.
    for name, t in zip(names, tensors, strict=True):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf")


def key_names(n: int) -> list[str]:
    """The public API's names for the keys: "key" for one, "key[i]" for a list."""
    return ["key"] if n == 1 else [f"key[{i}]" for i in range(n)]


def _check_patch_match(query, keys, patch_size, stride, padding, backend, precision) -> tuple[int, int]:
    """Checks the arguments of srntt::patch_match; returns the query grid."""
    geometry.check_patch(patch_size, stride, padding)
    if backend is not None:
        check_choice("backend", backend, dispatch.BACKENDS)
    check_choice("precision", precision, PRECISIONS)
    _check_rank("query", query, 4)
    if not keys:
        raise ValueError("keys: empty list; give at least one tensor")
    gh, gw = geometry.map_grid("query", query.shape[-2], query.shape[-1], patch_size, stride, padding)
    geometry.check_cells("query", query.shape[0] * gh * gw)
    geometry.check_descriptor("query", query.shape[1], patch_size)
    cells = 0
    for name, k in zip(key_names(len(keys)), keys, strict=True):
        _check_rank(name, k, 4)
        kh, kw = geometry.map_grid(name, k.shape[-2], k.shape[-1], patch_size, stride, padding)
        cells += kh * kw
    geometry.check_cells("key", query.shape[0] * cells)
    return gh, gw


def _check_feature_swap(values, index, patch_size, stride, padding, scale, reduce, backend) -> int:
    """Checks the arguments of srntt::feature_swap(_backward) but the output size; returns the
    number of key cells, the bound of the index values."""
    geometry.check_patch(patch_size, stride, padding)
    geometry.check_scale("scale", scale)
    check_choice("reduce", reduce, REDUCTIONS)
    if backend is not None:
        check_choice("backend", backend, dispatch.BACKENDS)
    _check_rank("index", index, 3)
    if index.dtype != torch.int64:
        raise TypeError(f"index: expected int64, got {index.dtype}")
    geometry.check_cells("index", index.numel())
    return sum(kh * kw for kh, kw in (
        geometry.value_grid(f"values[{i}]", h, w, scale, patch_size, stride, padding)
        for i, (h, w) in enumerate(values)))


def check_index_range(index: Tensor, n_cells: int, patch_size, stride, padding, scale) -> None:
    """Index values lie in [0, n_cells): negative values are not wrapped, nothing reads past
    the key grids."""
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n_cells:
        raise ValueError(
            f"index: values must be in [0, {n_cells}) (the key grid of values with patch_size={patch_size}, "
            f"stride={stride}, padding={padding}, scale={scale}), got range [{lo}, {hi}]")


def _check_out(name: str, b: int, c: int, out_h, out_w) -> None:
    # The ops allow an empty output (0 rows or columns); the public API does not.
    geometry.check_side(f"{name}_h", out_h, 0)
    geometry.check_side(f"{name}_w", out_w, 0)
    geometry.check_elements(f"{name}_h, {name}_w", (b, c, out_h, out_w))


def _value_sizes(value_sizes) -> list[tuple[int, int]]:
    if len(value_sizes) < 2 or len(value_sizes) % 2:
        raise ValueError(f"value_sizes: expected (H, W) pairs, got {list(value_sizes)}")
    return [(value_sizes[i], value_sizes[i + 1]) for i in range(0, len(value_sizes), 2)]


def _patch_match_fake(query, keys, patch_size, stride, padding, backend, precision):
    gh, gw = _check_patch_match(query, keys, patch_size, stride, padding, backend, precision)
    shape = (query.shape[0], gh, gw)
    return (query.new_empty(shape, dtype=torch.long),
            query.new_empty(shape, dtype=torch_backend.score_dtype(query.dtype)))


def _patch_match_op_fake(*args):
    index, score = _patch_match_fake(*args)
    return score, index


# The kernel-level ops take no backend; their fakes check the same bounds as the public ops' fakes
# (the C++ kernels check them again).
def _patch_match_fused_fake(query, keys, patch_size, stride, padding, precision):
    return _patch_match_fake(query, keys, patch_size, stride, padding, None, precision)


def _feature_swap_fused_fake(*args):
    return _feature_swap_fake(*args, None)


def _feature_swap_fused_backward_fake(*args):
    return _feature_swap_backward_fake(*args, None)


def _check_feature_swap_op(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce,
                           backend) -> int:
    if not values:
        raise ValueError("values: empty list; give at least one tensor")
    for i, v in enumerate(values):
        _check_rank(f"values[{i}]", v, 4)
    _check_out("out", values[0].shape[0], values[0].shape[1], out_h, out_w)
    return _check_feature_swap([v.shape[-2:] for v in values], index, patch_size, stride, padding, scale,
                               reduce, backend)


def _check_feature_swap_backward_op(grad, index, value_sizes, patch_size, stride, padding, scale, reduce,
                                    backend) -> tuple[list[tuple[int, int]], int]:
    _check_rank("grad_out", grad, 4)
    sizes = _value_sizes(value_sizes)
    for h, w in sizes:
        _check_out("value_sizes", grad.shape[0], grad.shape[1], h, w)
    return sizes, _check_feature_swap(sizes, index, patch_size, stride, padding, scale, reduce, backend)


def _feature_swap_fake(values, *args):
    _check_feature_swap_op(values, *args)
    return values[0].new_empty((values[0].shape[0], values[0].shape[1], args[5], args[6]))


def _feature_swap_backward_fake(grad, *args):
    sizes, _ = _check_feature_swap_backward_op(grad, *args)
    return [grad.new_empty((*grad.shape[:2], h, w)) for h, w in sizes]


# NB: declared with torch.library.define/impl rather than @torch.library.custom_op: custom_op wraps
# every kernel in torch._disable_dynamo, whose first call imports torch._dynamo (several seconds), a
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
    _check_patch_match(query, keys, patch_size, stride, padding, backend, precision)
    check_finite(["query", *key_names(len(keys))], [query, *keys])
    index, score = dispatch.get(backend).patch_match(query, keys, patch_size, stride, padding, precision)
    return score, index


torch.library.register_fake("srntt::patch_match")(_patch_match_op_fake)


class PatchMatch(NamedTuple):
    """Result of a patch match: ``index`` (int64, flat over the concatenated key grids) and ``score``
    (cosine) of the best key patch per query patch."""

    index: Tensor
    score: Tensor


def patch_match(query: Tensor, keys: list[Tensor], patch_size: int, stride: int, padding: int,
                backend: str, precision: str) -> PatchMatch:
    """``srntt::patch_match`` in the (index, score) order every layer above the op uses."""
    score, index = torch.ops.srntt.patch_match.default(query, keys, patch_size, stride, padding,
                                                        backend, precision)
    return PatchMatch(index, score)


def _patch_match_setup(ctx, inputs, output):
    query, keys, patch_size, stride, padding, _, _ = inputs
    ctx.geometry = (patch_size, stride, padding)
    ctx.n_keys = len(keys)
    ctx.save_for_backward(query, output[1], *keys)


def _patch_match_backward(ctx, grad_score, grad_index):
    query, index, *keys = ctx.saved_tensors
    grad_query, grad_keys = torch_backend.patch_match_score_backward(
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
    n_cells = _check_feature_swap_op(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce,
                                     backend)
    check_index_range(index, n_cells, patch_size, stride, padding, scale)
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
    _, n_cells = _check_feature_swap_backward_op(grad_out, index, value_sizes, patch_size, stride, padding,
                                                 scale, reduce, backend)
    check_index_range(index, n_cells, patch_size, stride, padding, scale)
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


def _feature_swap_backward_setup(ctx, inputs, output):
    grad_out, index, value_sizes, patch_size, stride, padding, scale, reduce, backend = inputs
    ctx.args = (patch_size, stride, padding, scale, grad_out.shape[-2], grad_out.shape[-1], reduce, backend)
    ctx.value_shapes = [(*grad_out.shape[:2], h, w) for h, w in _value_sizes(value_sizes)]
    ctx.dtype = grad_out.dtype
    ctx.save_for_backward(index)


def _feature_swap_backward_backward(ctx, grad_values):
    """The backward is linear in grad_out and the adjoint of the swap, so its own backward (the
    swap's double backward) is the swap of the incoming gradients."""
    (index,) = ctx.saved_tensors
    grads = [g if g is not None else index.new_zeros(shape, dtype=ctx.dtype)
             for g, shape in zip(grad_values, ctx.value_shapes, strict=True)]
    return feature_swap(grads, index, *ctx.args), None, None, None, None, None, None, None, None


torch.library.register_autograd("srntt::feature_swap_backward", _feature_swap_backward_backward,
                                setup_context=_feature_swap_backward_setup)


if extension.LOADED:
    for _name, _fake in (("_patch_match_fused", _patch_match_fused_fake),
                         ("_feature_swap_fused", _feature_swap_fused_fake),
                         ("_feature_swap_fused_backward", _feature_swap_fused_backward_fake)):
        torch.library.register_fake(f"srntt::{_name}")(_fake)
