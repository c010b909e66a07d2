"""Property tests: extreme integers (up to 2**64, negative, bool, 0) for every integer argument of
every public op, on every backend that runs here: a clean exception (ValueError, TypeError or
RuntimeError, with a message) or the oracle's result; never a signal, a hang or garbage.

A crash would kill the test process (and fail the run); the known crashers also run in a
subprocess in tests/test_bounds.py. Grids are kept small (a large stride where padding or
patch_size vary) so that every accepted value runs in milliseconds.
"""

import pytest
import torch
from conftest import features
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srntt_core.swap as sw
from srntt_core.ops import torch_backend

EXTREME = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 16, 17, 63, 64, 65, 2**16, 2**16 + 1, 2**31 - 1, 2**31, 2**32, 2**61,
                     2**62, 2**63 - 1, -(2**63), 2**63, 2**64, True, False]),
    st.integers(-3, 70),
)
INT64 = range(-(2**63), 2**63)
# NB: the `backend` fixture is an immutable description, safe to share between examples.
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def outcome(fn, value, words, op=False, kernel=False):
    """(result, None), or (None, exception) for a clean one: a ValueError or TypeError whose
    message names the argument (one of ``words``). Only an op (``op``) may answer a value that
    int64 cannot hold with the dispatcher's RuntimeError, before any of our code runs; a C++
    kernel-level op (``kernel``) reports data errors (index range) as a RuntimeError."""
    try:
        return fn(), None
    except (ValueError, TypeError, RuntimeError) as exc:
        if op and type(exc) is RuntimeError and not isinstance(value, bool) and value not in INT64:
            return None, exc
        if not kernel:
            assert isinstance(exc, (ValueError, TypeError)), f"{value}: {type(exc).__name__}: {exc}"
        assert any(w in str(exc) for w in words), f"{value}: {words} not named in: {exc}"
        return None, exc


# Base arguments per varied argument: the others keep the grids small for any accepted value.
MATCH_BASE = {"patch_size": dict(padding=32, stride=16), "stride": {}, "padding": dict(stride=16)}


@SETTINGS
@given(arg=st.sampled_from(sorted(MATCH_BASE)), value=EXTREME)
def test_patch_match_extreme_ints(backend, arg, value):
    q = features(1, 2, 3, 4, seed=1, dtype=torch.float64, device=backend.device)
    k = features(1, 2, 4, 3, seed=2, dtype=torch.float64, device=backend.device)
    kwargs = {**MATCH_BASE[arg], arg: value}
    got, err = outcome(lambda: sw.patch_match(q, k, backend=backend.name, **kwargs), value, [arg])
    want, want_err = outcome(lambda: sw.patch_match(q.cpu(), k.cpu(), backend="torch", **kwargs), value,
                             [arg])
    assert (err is None) == (want_err is None), (err, want_err)
    if err is None:
        assert torch.equal(got.index.cpu(), want.index)
        torch.testing.assert_close(got.score.cpu(), want.score)


SWAP_BASE = {"patch_size": dict(padding=32, stride=16), "stride": {}, "padding": dict(stride=16),
             "scale": dict(patch_size=1), "out_size": {}}


@SETTINGS
@given(arg=st.sampled_from(sorted(SWAP_BASE)), value=EXTREME)
def test_feature_swap_extreme_ints(backend, arg, value):
    v = features(1, 2, 8, 8, seed=3, dtype=torch.float64, device=backend.device)
    index = torch.zeros(1, 2, 2, dtype=torch.long, device=backend.device)
    kwargs = {**SWAP_BASE[arg], arg: (value, 4) if arg == "out_size" else value}
    got, err = outcome(lambda: sw.feature_swap(v, index, backend=backend.name, **kwargs), value, [arg])
    want, want_err = outcome(lambda: sw.feature_swap(v.cpu(), index.cpu(), backend="torch", **kwargs), value,
                             [arg])
    assert (err is None) == (want_err is None), (err, want_err)
    if err is None:
        torch.testing.assert_close(got.cpu(), want)


WEIGHT_ARGS = ("patch_size", "padding", "scales", "out_size")


@SETTINGS
@given(arg=st.sampled_from(WEIGHT_ARGS), value=EXTREME)
def test_weight_maps_extreme_ints(arg, value):
    score = torch.rand(1, 3, 4, dtype=torch.float64)
    kwargs = {"scales": dict(scales=(1, value)), "out_size": dict(out_size=(value, 5))}.get(arg, {arg: value})
    got, err = outcome(lambda: sw.weight_maps(score, **kwargs), value, [arg])
    if err is None:
        assert all(torch.isfinite(m).all() for m in got)


# ---------------------------------------------------------------------------------------------
# the op layer: torch.ops.srntt.* (every backend) and the C++ kernel-level ops

OP_MATCH_ARGS = ("patch_size", "stride", "padding")


@SETTINGS
@given(arg=st.sampled_from(OP_MATCH_ARGS), value=EXTREME)
def test_op_patch_match_extreme_ints(backend, arg, value):
    q = features(1, 2, 3, 4, seed=1, dtype=torch.float64, device=backend.device)
    k = features(1, 2, 4, 3, seed=2, dtype=torch.float64, device=backend.device)
    a = {"patch_size": 3, "stride": 1, "padding": 0, **MATCH_BASE[arg], arg: value}
    args = (a["patch_size"], a["stride"], a["padding"])
    got, err = outcome(lambda: torch.ops.srntt.patch_match(q, [k], *args, backend.name, "highest"), value,
                       [arg], op=True)
    if err is None:
        # The dispatcher hands a bool to an int argument as 0 or 1, so the op may accept one.
        index, score = torch_backend.patch_match(q.cpu(), [k.cpu()], *map(int, args))
        assert torch.equal(got[1].cpu(), index)
        torch.testing.assert_close(got[0].cpu(), score)
    if backend.name == "cpu":
        got, err = outcome(lambda: torch.ops.srntt._patch_match_fused(q, [k], *args, "highest"), value, [arg],
                           op=True)
        if err is None:
            assert torch.equal(got[0], torch_backend.patch_match(q, [k], *map(int, args))[0])


OP_SWAP_ARGS = ("patch_size", "stride", "padding", "scale", "out_h", "out_w")


def _swap_args(arg, value):
    a = {"patch_size": 3, "stride": 1, "padding": 0, "scale": 1, "out_h": 4, "out_w": 4,
         **SWAP_BASE.get(arg, {}), arg: value}
    return tuple(a[n] for n in OP_SWAP_ARGS)


@SETTINGS
@given(arg=st.sampled_from(OP_SWAP_ARGS), value=EXTREME, reduce=st.sampled_from(["mean", "sum"]))
def test_op_feature_swap_extreme_ints(backend, arg, value, reduce):
    v = features(1, 2, 8, 8, seed=3, dtype=torch.float64, device=backend.device)
    index = torch.ones(1, 2, 2, dtype=torch.long, device=backend.device)
    args = _swap_args(arg, value)
    ops = [(False, lambda: torch.ops.srntt.feature_swap([v], index, *args, reduce, backend.name))]
    if backend.name == "cpu":
        ops.append((True, lambda: torch.ops.srntt._feature_swap_fused([v], index, *args, reduce)))
    for kernel, op in ops:
        got, err = outcome(op, value, [arg, "values", "index"], op=True, kernel=kernel)
        if err is None:
            want = torch_backend.feature_swap([v.cpu()], index.cpu(), *args, reduce)
            torch.testing.assert_close(got.cpu(), want)


@SETTINGS
@given(arg=st.sampled_from(("patch_size", "stride", "padding", "scale", "value_h")), value=EXTREME)
def test_op_feature_swap_backward_extreme_ints(backend, arg, value):
    grad = features(1, 2, 4, 4, seed=4, dtype=torch.float64, device=backend.device)
    index = torch.ones(1, 2, 2, dtype=torch.long, device=backend.device)
    p, s, pad, scale, _, _ = _swap_args(arg, value)
    sizes = [value if arg == "value_h" else 8, 8]
    ops = [(False, lambda: torch.ops.srntt.feature_swap_backward(grad, index, sizes, p, s, pad, scale,
                                                                 "mean", backend.name))]
    if backend.name == "cpu":
        ops.append((True, lambda: torch.ops.srntt._feature_swap_fused_backward(grad, index, sizes, p, s, pad,
                                                                               scale, "mean")))
    for kernel, op in ops:
        words = [arg, "value_sizes", "values", "a values map", "index"]
        got, err = outcome(op, value, words, op=True, kernel=kernel)
        if err is None:
            want = torch_backend.feature_swap_backward(grad.cpu(), index.cpu(), sizes, p, s, pad, scale,
                                                       "mean")
            torch.testing.assert_close([g.cpu() for g in got], want)


def test_op_feature_swap_negative_index_is_not_wrapped(backend):
    """A negative index at the op level is an error, not Python-style wrapping to the last cell."""
    v = features(1, 2, 8, 8, seed=3, device=backend.device)
    index = torch.full((1, 2, 2), -1, dtype=torch.long, device=backend.device)
    with pytest.raises(ValueError, match="index"):
        torch.ops.srntt.feature_swap([v], index, 3, 1, 0, 1, 4, 4, "mean", backend.name)
    with pytest.raises(ValueError, match="index"):
        torch.ops.srntt.feature_swap_backward(v[..., :4, :4], index, [8, 8], 3, 1, 0, 1, "mean", backend.name)
